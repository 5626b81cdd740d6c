"""An SMTP server for the notification tests: aiosmtpd with a handler that
keeps every accepted message as one JSON file.

    PYTHONPATH=<this directory> python -m aiosmtpd -n -l 127.0.0.1:PORT -c smtp_sink.JsonDir DIR

Each file holds the envelope and the message as a mail client reads it
(decoded headers, plain-text body), so the tests assert on what a customer
sees. Files are written under a temporary name and renamed, so a reader never
sees half a message.

Some recipients misbehave on purpose: a local part starting with "flaky" is
refused with 451 (try again later) the first time it is seen, one starting
with "bounce" always with 550 (no such mailbox).
"""

import json
import os
import uuid
from email import message_from_bytes, policy


class JsonDir:
    def __init__(self, directory):
        self.directory = directory
        self.refused_once = set()
        os.makedirs(directory, exist_ok=True)

    @classmethod
    def from_cli(cls, parser, *args):
        if len(args) != 1:
            parser.error("smtp_sink.JsonDir takes one argument: the directory")
        return cls(args[0])

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        local = address.split("@", 1)[0]
        if local.startswith("bounce"):
            return "550 5.1.1 No such mailbox here"
        if local.startswith("flaky") and address not in self.refused_once:
            self.refused_once.add(address)
            return "451 4.3.0 Try again later"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        message = message_from_bytes(envelope.content, policy=policy.default)
        body = message.get_body(preferencelist=("plain",))
        record = {
            "mail_from": envelope.mail_from,
            "rcpt_tos": envelope.rcpt_tos,
            "from": str(message["From"]),
            "to": str(message["To"]),
            "subject": str(message["Subject"]),
            "message_id": str(message["Message-ID"]),
            "content_type": message.get_content_type(),
            "body": body.get_content() if body is not None else None,
        }
        name = uuid.uuid4().hex
        partial = os.path.join(self.directory, "." + name + ".partial")
        with open(partial, "w", encoding="utf-8") as f:
            json.dump(record, f)
        os.replace(partial, os.path.join(self.directory, name + ".json"))
        return "250 Message accepted for delivery"
