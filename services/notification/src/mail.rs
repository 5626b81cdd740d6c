//! E-mail to the customer over SMTP.

use std::time::Duration;

use lettre::message::Mailbox;
use lettre::message::header::ContentType;
use lettre::transport::smtp::AsyncSmtpTransport;
use lettre::{AsyncTransport, Message, Tokio1Executor};

use dishpatch_api::events::EventType;

use crate::config::EventSet;
use crate::templates::Rendered;

/// Why an e-mail was not sent.
#[derive(Debug, thiserror::Error)]
pub enum MailError {
    #[error("{address:?} is not an address we can send to: {source}")]
    Address {
        address: String,
        source: lettre::address::AddressError,
    },
    #[error("building the message: {0}")]
    Build(#[from] lettre::error::Error),
    #[error("smtp: {0}")]
    Smtp(#[from] lettre::transport::smtp::Error),
}

impl MailError {
    /// Whether sending again can't help: a bad address or message, or a 5xx
    /// reply. A 4xx reply, a refused connection or a timeout may pass.
    pub fn is_permanent(&self) -> bool {
        match self {
            MailError::Address { .. } | MailError::Build(_) => true,
            MailError::Smtp(e) => e.is_permanent(),
        }
    }
}

/// The `Message-ID` of the e-mail about an event. Derived from the event id,
/// so a duplicate delivery of an event produces a recognisably identical mail.
pub fn message_id(event_id: &str) -> String {
    // Event ids are `<uid>.<routing key>`; keep the header well-formed whatever arrives.
    let local: String = event_id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_') {
                c
            } else {
                '-'
            }
        })
        .collect();
    format!("<{local}@dishpatch.dev>")
}

/// Sends e-mails through one SMTP server (plain SMTP: a local relay or MTA
/// that takes it from there).
pub struct Mailer {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    from: Mailbox,
    /// The events the customer is e-mailed about.
    events: EventSet,
}

impl Mailer {
    pub fn new(host: &str, port: u16, timeout: Duration, from: Mailbox, events: EventSet) -> Self {
        let transport = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(host)
            .port(port)
            .timeout(Some(timeout))
            .build();
        Self {
            transport,
            from,
            events,
        }
    }

    /// Whether the customer is e-mailed about `kind`.
    pub fn mails(&self, kind: EventType) -> bool {
        self.events.contains(kind)
    }

    /// Sends `mail` to `to`, returning once the server has accepted it.
    pub async fn send(
        &self,
        to: &str,
        message_id: String,
        mail: &Rendered,
    ) -> Result<(), MailError> {
        let to_mailbox: Mailbox = to.parse().map_err(|source| MailError::Address {
            address: to.to_string(),
            source,
        })?;
        let message = Message::builder()
            .from(self.from.clone())
            .to(to_mailbox)
            .subject(mail.subject.clone())
            .message_id(Some(message_id))
            .header(ContentType::TEXT_PLAIN)
            .body(mail.body.clone())?;
        self.transport.send(message).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_ids_follow_the_event_id() {
        assert_eq!(
            message_id("3f1c-77.delivery.picked_up"),
            "<3f1c-77.delivery.picked_up@dishpatch.dev>"
        );
        assert_eq!(message_id("a b>c"), "<a-b-c@dishpatch.dev>");
    }

    #[test]
    fn bad_addresses_are_permanent() {
        let err = "not an address"
            .parse::<Mailbox>()
            .map_err(|source| MailError::Address {
                address: "not an address".into(),
                source,
            })
            .unwrap_err();
        assert!(err.is_permanent());
    }
}
