//! The committed `crds/*.yaml` must be exactly what the Rust types generate.

use std::collections::BTreeMap;

#[test]
fn committed_crds_match_the_rust_types() {
    let dir = dishpatch_testkit::workspace_root().join("crds");
    let committed: BTreeMap<String, String> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|entry| {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read_to_string(&path).unwrap())
        })
        .collect();
    let generated: BTreeMap<String, String> = dishpatch_api::crd_files()
        .unwrap()
        .into_iter()
        .map(|f| (f.file_name, f.contents))
        .collect();

    assert_eq!(
        committed.keys().collect::<Vec<_>>(),
        generated.keys().collect::<Vec<_>>(),
        "crds/ holds other files than the types generate; run `make crds`"
    );
    for (name, want) in &generated {
        assert!(
            committed[name] == *want,
            "crds/{name} differs from the Rust types; run `make crds` and commit the result"
        );
    }
}

#[test]
fn status_lists_are_maps_so_writers_do_not_wipe_each_other() {
    for crd in dishpatch_api::crds() {
        let json = serde_json::to_value(&crd).unwrap();
        let name = crd.metadata.name.unwrap();
        let status =
            &json["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"];
        let conditions = &status["properties"]["conditions"];
        assert_eq!(conditions["x-kubernetes-list-type"], "map", "{name}");
        assert_eq!(
            conditions["x-kubernetes-list-map-keys"],
            serde_json::json!(["type"]),
            "{name}"
        );
        assert_eq!(
            json["spec"]["versions"][0]["subresources"]["status"],
            serde_json::json!({}),
            "{name} must have the status subresource"
        );
    }
}
