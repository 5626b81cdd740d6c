//! `dishpatch-kitchen`: not built yet. It lands with its own issue; until then
//! it says so and exits non-zero rather than pretending to run.

fn main() {
    eprintln!(
        "dishpatch-kitchen {}: this service is not implemented yet (API group {})",
        env!("CARGO_PKG_VERSION"),
        dishpatch_api::GROUP
    );
    std::process::exit(2);
}
