"""Every dishpatch_/rabbitmq_ metric the chart's alerts and dashboard read is
served by a scrape of the installed release.

    python3 e2e/helm/metrics_served.py ALERTS.yaml DASHBOARD.json SCRAPE_DIR

SCRAPE_DIR holds one text-format scrape per pod (*.prom). Prints how many
metric names were checked; exits non-zero naming the missing ones.
"""
import glob
import json
import re
import sys

alerts, dashboard, scrapes = sys.argv[1:4]
served = set()
for path in glob.glob(scrapes + "/*.prom"):
    for line in open(path):
        if line.startswith("# TYPE "):
            served.add(line.split()[2])
        elif line.strip() and not line.startswith("#"):
            served.add(re.split(r"[{ ]", line, maxsplit=1)[0])
exprs = [t["expr"] for p in json.load(open(dashboard))["panels"] for t in p["targets"]]
text = open(alerts).read() + "\n".join(exprs)
wanted = set(re.findall(r"\b((?:dishpatch|rabbitmq)_[a-z_]+)", text))
missing = sorted(w for w in wanted if w not in served)
if missing:
    sys.exit(f"not served: {', '.join(missing)}")
print(len(wanted))
