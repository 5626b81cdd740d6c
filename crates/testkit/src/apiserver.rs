//! The apiserver's own request counters (`apiserver_request_total`), for
//! benchmarks that count API writes. The apiserver counts everyone's
//! requests, so a benchmark that reads them runs alone on the control plane.

use std::collections::BTreeMap;

use kube::Client;

/// One kind of write as the apiserver counts it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Write {
    /// `orders`, `orders/status`, `events`, `configmaps` …
    pub resource: String,
    /// `POST`, `PUT`, `PATCH`, `APPLY`, `DELETE`.
    pub verb: String,
    /// The HTTP status code (`201`, `409` …).
    pub code: String,
}

impl Write {
    /// Whether the write changed something (2xx).
    pub fn succeeded(&self) -> bool {
        self.code.starts_with('2')
    }
}

impl std::fmt::Display for Write {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.resource, self.verb)?;
        if !self.succeeded() {
            write!(f, " ({})", self.code)?;
        }
        Ok(())
    }
}

/// Every mutating request the apiserver has served since it started, by
/// resource, verb and code.
pub async fn writes(client: &Client) -> Result<BTreeMap<Write, f64>, kube::Error> {
    let req = http::Request::get("/metrics")
        .body(Vec::new())
        .map_err(kube::Error::HttpError)?;
    let text = client.request_text(req).await?;
    Ok(parse(&text))
}

/// The mutating requests in a `/metrics` text.
pub fn parse(text: &str) -> BTreeMap<Write, f64> {
    let mut out = BTreeMap::new();
    for line in text
        .lines()
        .filter(|l| l.starts_with("apiserver_request_total{"))
    {
        let Some((labels, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let label = |k: &str| {
            labels
                .split(&format!("{k}=\""))
                .nth(1)
                .and_then(|r| r.split('"').next())
                .unwrap_or("")
                .to_string()
        };
        let verb = label("verb");
        if !matches!(verb.as_str(), "POST" | "PUT" | "PATCH" | "APPLY" | "DELETE") {
            continue;
        }
        let sub = label("subresource");
        let resource = match (label("resource"), sub.is_empty()) {
            (r, true) => r,
            (r, false) => format!("{r}/{sub}"),
        };
        let key = Write {
            resource,
            verb,
            code: label("code"),
        };
        *out.entry(key).or_insert(0.0) += value.parse::<f64>().unwrap_or(0.0);
    }
    out
}

/// What happened between two readings of [`writes`]; kinds that did not
/// change are left out.
pub fn delta(before: &BTreeMap<Write, f64>, after: &BTreeMap<Write, f64>) -> BTreeMap<Write, f64> {
    after
        .iter()
        .filter_map(|(k, v)| {
            let d = v - before.get(k).copied().unwrap_or(0.0);
            (d > 0.0).then(|| (k.clone(), d))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_mutating_requests_by_resource_verb_and_code() {
        let text = r#"# HELP apiserver_request_total x
apiserver_request_total{code="200",component="apiserver",dry_run="",group="dishpatch.dev",resource="orders",scope="resource",subresource="status",verb="APPLY",version="v1alpha1"} 12
apiserver_request_total{code="409",component="apiserver",dry_run="",group="dishpatch.dev",resource="orders",scope="resource",subresource="status",verb="APPLY",version="v1alpha1"} 2
apiserver_request_total{code="200",component="apiserver",dry_run="",group="dishpatch.dev",resource="orders",scope="resource",subresource="",verb="GET",version="v1alpha1"} 99
apiserver_request_total{code="201",component="apiserver",dry_run="",group="events.k8s.io",resource="events",scope="resource",subresource="",verb="POST",version="v1"} 3
"#;
        let w = parse(text);
        assert_eq!(w.len(), 3, "{w:?}");
        let applied = Write {
            resource: "orders/status".into(),
            verb: "APPLY".into(),
            code: "200".into(),
        };
        assert_eq!(w.get(&applied), Some(&12.0));
        let conflicts: Vec<_> = w.keys().filter(|k| !k.succeeded()).collect();
        assert_eq!(conflicts.len(), 1);
        assert_eq!(conflicts[0].to_string(), "orders/status APPLY (409)");

        let mut later = w.clone();
        *later.get_mut(&applied).unwrap() += 5.0;
        let d = delta(&w, &later);
        assert_eq!(d.into_iter().collect::<Vec<_>>(), vec![(applied, 5.0)]);
    }
}
