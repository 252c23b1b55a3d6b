//! What a kubelet does with a ConfigMap or Secret volume, for a gateway Envoy run outside a cluster:
//! the object's keys are written into a timestamped directory, `..data` is swapped to it atomically
//! (a symlink renamed over the old one), and each key is a visible symlink `<key> -> ..data/<key>`.
//! The volume is kept in sync with the API server (polled every 200 ms, much faster than a kubelet).

use std::collections::BTreeMap;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::Client;
use kube::api::Api;

/// Writes `data` into `dir` the way the kubelet's atomic writer does.
pub fn write_volume(
    dir: &Path,
    data: &BTreeMap<String, Vec<u8>>,
    generation: u64,
) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let ts = format!(
        "..{}_{generation}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    );
    let new_dir = dir.join(&ts);
    std::fs::create_dir(&new_dir)?;
    for (key, value) in data {
        std::fs::write(new_dir.join(key), value)?;
    }
    let old_target = std::fs::read_link(dir.join("..data")).ok();
    let tmp = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp);
    symlink(&ts, &tmp)?;
    std::fs::rename(&tmp, dir.join("..data"))?;
    for key in data.keys() {
        let link = dir.join(key);
        if std::fs::symlink_metadata(&link).is_err() {
            symlink(PathBuf::from("..data").join(key), &link)?;
        }
    }
    // Keys no longer in the object lose their visible link.
    for entry in std::fs::read_dir(dir)? {
        let name = entry?.file_name().into_string().unwrap_or_default();
        if !name.starts_with("..") && !data.contains_key(&name) {
            std::fs::remove_file(dir.join(&name))?;
        }
    }
    if let Some(old) = old_target {
        let _ = std::fs::remove_dir_all(dir.join(old));
    }
    Ok(())
}

/// Keeps a ConfigMap and a Secret materialised in two directories.
pub struct Volumes {
    stop: Arc<AtomicBool>,
    /// Number of swaps written so far (both volumes).
    pub swaps: Arc<AtomicU64>,
}

impl Drop for Volumes {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

impl Volumes {
    pub fn start(
        client: Client,
        ns: &str,
        config_map: &str,
        secret: &str,
        config_dir: PathBuf,
        keys_dir: PathBuf,
    ) -> Volumes {
        let stop = Arc::new(AtomicBool::new(false));
        let swaps = Arc::new(AtomicU64::new(0));
        let (cms, secrets): (Api<ConfigMap>, Api<Secret>) = (
            Api::namespaced(client.clone(), ns),
            Api::namespaced(client, ns),
        );
        let (cm_name, secret_name) = (config_map.to_string(), secret.to_string());
        let (stop2, swaps2) = (stop.clone(), swaps.clone());
        tokio::spawn(async move {
            let mut last_cm: Option<BTreeMap<String, Vec<u8>>> = None;
            let mut last_secret: Option<BTreeMap<String, Vec<u8>>> = None;
            let mut generation = 0;
            while !stop2.load(Ordering::Relaxed) {
                // Keys first, as the kubelet may well do it in either order; the operator's
                // publishing order must make both orders safe.
                if let Ok(Some(s)) = secrets.get_opt(&secret_name).await {
                    let data: BTreeMap<String, Vec<u8>> = s
                        .data
                        .unwrap_or_default()
                        .into_iter()
                        .map(|(k, v)| (k, v.0))
                        .collect();
                    if last_secret.as_ref() != Some(&data) {
                        generation += 1;
                        write_volume(&keys_dir, &data, generation).expect("write keys volume");
                        swaps2.fetch_add(1, Ordering::Relaxed);
                        last_secret = Some(data);
                    }
                }
                if let Ok(Some(cm)) = cms.get_opt(&cm_name).await {
                    let data: BTreeMap<String, Vec<u8>> = cm
                        .data
                        .unwrap_or_default()
                        .into_iter()
                        .map(|(k, v)| (k, v.into_bytes()))
                        .collect();
                    if last_cm.as_ref() != Some(&data) {
                        generation += 1;
                        write_volume(&config_dir, &data, generation).expect("write config volume");
                        swaps2.fetch_add(1, Ordering::Relaxed);
                        last_cm = Some(data);
                    }
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
        Volumes { stop, swaps }
    }
}
