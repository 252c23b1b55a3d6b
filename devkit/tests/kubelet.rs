//! The atomic writer, on a temporary directory (syncing with an API server is exercised by the
//! root crate's gateway end-to-end test).

use std::collections::BTreeMap;

use llmroute_devkit::kubelet::write_volume;

fn data(pairs: &[(&str, &str)]) -> BTreeMap<String, Vec<u8>> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
        .collect()
}

#[test]
fn swaps_data_atomically_with_visible_links() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_volume(d, &data(&[("a", "1"), ("b", "2")]), 1).unwrap();
    let first = std::fs::read_link(d.join("..data")).unwrap();
    assert!(first.to_str().unwrap().starts_with("..") && first.to_str().unwrap().ends_with("_1"));
    assert_eq!(
        std::fs::read_link(d.join("a")).unwrap(),
        std::path::Path::new("..data/a")
    );
    assert_eq!(std::fs::read_to_string(d.join("a")).unwrap(), "1");

    write_volume(d, &data(&[("a", "3"), ("c", "4")]), 2).unwrap();
    let second = std::fs::read_link(d.join("..data")).unwrap();
    assert_ne!(first, second);
    assert!(
        !d.join(&first).exists(),
        "the old timestamped directory is removed"
    );
    assert_eq!(std::fs::read_to_string(d.join("a")).unwrap(), "3");
    assert_eq!(std::fs::read_to_string(d.join("c")).unwrap(), "4");
    assert!(
        std::fs::symlink_metadata(d.join("b")).is_err(),
        "a removed key loses its link"
    );
    assert!(!d.join("..data_tmp").exists());
    let mut names: Vec<String> = std::fs::read_dir(d)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| !n.starts_with(".."))
        .collect();
    names.sort();
    assert_eq!(names, ["a", "c"]);
}
