//! The Prometheus text format (0.0.4) from `prometheus-client`'s
//! OpenMetrics text, for scrapers that do not ask for OpenMetrics:
//! `promtool check metrics`, `curl`, older Prometheus servers.
//!
//! The two formats share sample lines and label escaping. They differ in
//! what this rewrites: an OpenMetrics counter family is named without
//! `_total` while its samples carry it (0.0.4 names the family as the
//! samples), OpenMetrics has `# UNIT` lines, a `# EOF` terminator, the
//! `unknown` type (0.0.4: `untyped`), and escapes `"` in HELP text.

use std::collections::HashSet;

/// What Prometheus servers send when they prefer OpenMetrics.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// The classic text format.
pub const TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Whether a scraper's `Accept` header asks for OpenMetrics.
pub fn wants_openmetrics(accept: Option<&str>) -> bool {
    accept.is_some_and(|a| {
        a.split(',').any(|part| {
            let mut params = part.split(';').map(str::trim);
            let media = params.next().unwrap_or_default();
            // `q=0` means "not acceptable".
            let refused = params.any(|p| p.replace(' ', "") == "q=0");
            media.eq_ignore_ascii_case("application/openmetrics-text") && !refused
        })
    })
}

/// Rewrites OpenMetrics text, as `prometheus_client::encoding::text::encode`
/// writes it, into the 0.0.4 text format.
pub fn to_text_format(openmetrics: &str) -> String {
    let counters: HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.split_once(' '))
        .filter(|(_, kind)| *kind == "counter")
        .map(|(name, _)| name)
        .collect();
    let family = |name: &str| {
        if counters.contains(name) && !name.ends_with("_total") {
            format!("{name}_total")
        } else {
            name.to_string()
        }
    };
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
            out.push_str(&format!(
                "# HELP {} {}\n",
                family(name),
                help.replace("\\\"", "\"")
            ));
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "untyped"));
            let kind = if kind == "unknown" { "untyped" } else { kind };
            out.push_str(&format!("# TYPE {} {kind}\n", family(name)));
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::encoding::EncodeLabelSet;
    use prometheus_client::metrics::counter::Counter;
    use prometheus_client::metrics::family::Family;
    use prometheus_client::metrics::gauge::Gauge;
    use prometheus_client::metrics::histogram::Histogram;
    use prometheus_client::registry::Registry;

    #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
    struct Labels {
        event: String,
    }

    fn encoded() -> String {
        let mut registry = Registry::default();
        let r = registry.sub_registry_with_prefix("dishpatch_x");
        let messages = Family::<Labels, Counter>::default();
        messages
            .get_or_create(&Labels {
                event: "order \"accepted\"".into(),
            })
            .inc();
        r.register("messages", "Messages \"handled\"", messages);
        let leader = Gauge::<i64>::default();
        leader.set(1);
        r.register("leader", "1 while leading", leader);
        let duration = Histogram::new([0.1, 1.0]);
        duration.observe(0.5);
        r.register("handle_duration_seconds", "Handling time", duration);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        text
    }

    #[test]
    fn counters_are_named_as_their_samples_and_openmetrics_only_lines_go() {
        let text = to_text_format(&encoded());
        assert_eq!(
            text,
            concat!(
                "# HELP dishpatch_x_messages_total Messages \"handled\".\n",
                "# TYPE dishpatch_x_messages_total counter\n",
                "dishpatch_x_messages_total{event=\"order \\\"accepted\\\"\"} 1\n",
                "# HELP dishpatch_x_leader 1 while leading.\n",
                "# TYPE dishpatch_x_leader gauge\n",
                "dishpatch_x_leader 1\n",
                "# HELP dishpatch_x_handle_duration_seconds Handling time.\n",
                "# TYPE dishpatch_x_handle_duration_seconds histogram\n",
                "dishpatch_x_handle_duration_seconds_sum 0.5\n",
                "dishpatch_x_handle_duration_seconds_count 1\n",
                "dishpatch_x_handle_duration_seconds_bucket{le=\"0.1\"} 0\n",
                "dishpatch_x_handle_duration_seconds_bucket{le=\"1.0\"} 1\n",
                "dishpatch_x_handle_duration_seconds_bucket{le=\"+Inf\"} 1\n",
            )
        );
    }

    #[test]
    fn unknown_becomes_untyped_and_units_go() {
        let om = "# HELP a_seconds A.\n# TYPE a_seconds unknown\n# UNIT a_seconds seconds\na_seconds 2\n# EOF\n";
        assert_eq!(
            to_text_format(om),
            "# HELP a_seconds A.\n# TYPE a_seconds untyped\na_seconds 2\n"
        );
    }

    #[test]
    fn openmetrics_only_when_asked_for() {
        let prometheus = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        assert!(wants_openmetrics(Some(prometheus)));
        assert!(!wants_openmetrics(Some("text/plain;version=0.0.4")));
        assert!(!wants_openmetrics(Some("*/*")));
        assert!(!wants_openmetrics(None));
        assert!(!wants_openmetrics(Some(
            "application/openmetrics-text; q=0, text/plain"
        )));
    }
}
