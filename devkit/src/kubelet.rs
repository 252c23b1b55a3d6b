//! What a kubelet does with a ConfigMap or Secret volume, for a gateway Envoy run outside a cluster:
//! the object's keys are written into a timestamped directory, `..data` is swapped to it atomically
//! (a symlink renamed over the old one), and each key is a visible symlink `<key> -> ..data/<key>`.
//! Volumes are kept in sync with the API server (polled every 200 ms by default, much faster than a
//! kubelet).

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
    let old_target = swap_data(dir, data, generation)?;
    link_keys(dir, data, old_target)
}

/// The first half of the kubelet's atomic writer (its steps 5 to 8): a new timestamped directory
/// holding `data`, then `..data` renamed onto it. A key new in `data` has no visible symlink yet:
/// that is the state a reader may observe between the rename and [`link_keys`]. Returns the
/// previous `..data` target.
pub fn swap_data(
    dir: &Path,
    data: &BTreeMap<String, Vec<u8>>,
    generation: u64,
) -> std::io::Result<Option<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let ts = format!(
        "..{}_{generation}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
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
    Ok(old_target)
}

/// The second half of the atomic writer (its steps 9 to 11): visible symlinks for new keys, the
/// links of removed keys deleted, the previous timestamped directory removed.
pub fn link_keys(
    dir: &Path,
    data: &BTreeMap<String, Vec<u8>>,
    old_target: Option<PathBuf>,
) -> std::io::Result<()> {
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

/// The object a volume shows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    ConfigMap(String),
    Secret(String),
}

/// One volume: an object of the namespace materialised in a directory.
#[derive(Clone, Debug)]
pub struct Mount {
    pub source: Source,
    pub dir: PathBuf,
}

/// Volumes kept in sync in the background until dropped.
pub struct Volumes {
    stop: Arc<AtomicBool>,
    /// Number of swaps written so far (all volumes).
    pub swaps: Arc<AtomicU64>,
}

impl Volumes {
    /// Resolves once these volumes are dropped (polled every 200 ms): lets a runtime dedicated to
    /// them end with them.
    pub fn stopped(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let stop = self.stop.clone();
        async move {
            while !stop.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

impl Drop for Volumes {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

async fn fetch(client: &Client, ns: &str, source: &Source) -> Option<BTreeMap<String, Vec<u8>>> {
    match source {
        Source::Secret(name) => {
            let api: Api<Secret> = Api::namespaced(client.clone(), ns);
            let s = api.get_opt(name).await.ok()??;
            let mut data: BTreeMap<String, Vec<u8>> = s
                .data
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, v.0))
                .collect();
            for (k, v) in s.string_data.unwrap_or_default() {
                data.insert(k, v.into_bytes());
            }
            Some(data)
        }
        Source::ConfigMap(name) => {
            let api: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
            let cm = api.get_opt(name).await.ok()??;
            let mut data: BTreeMap<String, Vec<u8>> = cm
                .data
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, v.into_bytes()))
                .collect();
            for (k, v) in cm.binary_data.unwrap_or_default() {
                data.insert(k, v.0);
            }
            Some(data)
        }
    }
}

impl Volumes {
    /// Keeps a ConfigMap and a Secret materialised in two directories (the Secret is polled first,
    /// as a kubelet may do it in either order; the operator's publishing order must make both safe).
    pub fn start(
        client: Client,
        ns: &str,
        config_map: &str,
        secret: &str,
        config_dir: PathBuf,
        keys_dir: PathBuf,
    ) -> Volumes {
        Volumes::sync(
            client,
            ns,
            vec![
                Mount {
                    source: Source::Secret(secret.to_string()),
                    dir: keys_dir,
                },
                Mount {
                    source: Source::ConfigMap(config_map.to_string()),
                    dir: config_dir,
                },
            ],
            Duration::from_millis(200),
        )
    }

    /// Keeps every mount in sync, polling each object in order every `interval`. A write error is
    /// reported on stderr and retried at the next poll.
    pub fn sync(client: Client, ns: &str, mounts: Vec<Mount>, interval: Duration) -> Volumes {
        let stop = Arc::new(AtomicBool::new(false));
        let swaps = Arc::new(AtomicU64::new(0));
        let (stop2, swaps2, ns) = (stop.clone(), swaps.clone(), ns.to_string());
        tokio::spawn(async move {
            let mut last: Vec<Option<BTreeMap<String, Vec<u8>>>> = vec![None; mounts.len()];
            let mut generation = 0;
            while !stop2.load(Ordering::Relaxed) {
                for (mount, last) in mounts.iter().zip(last.iter_mut()) {
                    let Some(data) = fetch(&client, &ns, &mount.source).await else {
                        continue;
                    };
                    if last.as_ref() == Some(&data) {
                        continue;
                    }
                    generation += 1;
                    match write_volume(&mount.dir, &data, generation) {
                        Ok(()) => {
                            swaps2.fetch_add(1, Ordering::Relaxed);
                            *last = Some(data);
                        }
                        Err(e) => eprintln!("kubelet: writing {}: {e}", mount.dir.display()),
                    }
                }
                tokio::time::sleep(interval).await;
            }
        });
        Volumes { stop, swaps }
    }
}
