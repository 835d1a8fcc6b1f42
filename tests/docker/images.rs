//! The images themselves: the Envoy image is FROM scratch, runs as a non-root user and serves
//! its own configuration; the plugin, in both forms Istio pulls, goes through a real registry
//! on loopback (Debian's docker-registry) and comes back byte for byte (skopeo, and Docker's
//! own push).

use crate::{built_wasm, command, fresh_connections, run, VERSION};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

const ENVOY_IMAGE: &str = "localhost/envoy-resilience/envoy";
const PLUGIN_IMAGE: &str = "localhost/envoy-resilience/plugin";
/// Where the plugin goes in the test's registry.
const REPOSITORY: &str = "envoy-resilience/plugin";

fn docker(args: &[&str]) -> String {
    run(&mut command("docker", args))
}

/// The files of an image, by `docker export` of a container created (not started) from it.
fn files_of(image: &str) -> Vec<String> {
    let container = docker(&["create", image]).trim().to_owned();
    let tar = command("docker", &["export", &container])
        .output()
        .expect("docker export");
    docker(&["rm", &container]);
    let mut listing = Command::new("tar")
        .args(["-t"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    listing
        .stdin
        .take()
        .unwrap()
        .write_all(&tar.stdout)
        .unwrap();
    let listed = listing.wait_with_output().unwrap();
    String::from_utf8(listed.stdout)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

#[test]
fn the_envoy_image_holds_envoy_its_libraries_the_filter_and_nothing_else() {
    let image = format!("{ENVOY_IMAGE}:{VERSION}");
    let inspect: Value = serde_json::from_str(&docker(&["image", "inspect", &image])).unwrap();
    let config = &inspect[0]["Config"];
    assert_eq!(config["User"], "101:101");
    assert_eq!(config["Entrypoint"][0], "/usr/local/bin/envoy");
    // One layer: nothing under it, so nothing was pulled.
    assert_eq!(inspect[0]["RootFS"]["Layers"].as_array().unwrap().len(), 1);

    let files: Vec<String> = files_of(&image)
        .into_iter()
        .filter(|f| !f.ends_with('/'))
        .collect();
    let mut expected = vec![
        "etc/envoy/envoy.yaml",
        "etc/envoy/envoy_resilience.wasm",
        "etc/envoy/upstream.yaml",
        "etc/group",
        "etc/passwd",
        "etc/ld.so.conf",
        "etc/ld.so.cache",
        "etc/ssl/certs/ca-certificates.crt",
        "usr/local/bin/envoy",
    ];
    // Docker adds these to every container it creates.
    let added = [
        ".dockerenv",
        "etc/hostname",
        "etc/mtab",
        "etc/hosts",
        "etc/resolv.conf",
        "dev/console",
        "dev/pts",
        "dev/shm",
        "proc",
        "sys",
    ];
    // Exactly the libraries the binary names (NEEDED), and its loader where it asks for it.
    let binary = crate::repository().join("target/docker/envoy/rootfs/usr/local/bin/envoy");
    let dynamic = run(Command::new("readelf").arg("-d").arg(&binary));
    let mut needed: Vec<&str> = dynamic
        .lines()
        .filter(|l| l.contains("(NEEDED)"))
        .filter_map(|l| l.split('[').nth(1)?.strip_suffix(']'))
        .collect();
    let headers = run(Command::new("readelf").arg("-l").arg(&binary));
    let loader = headers
        .split("[Requesting program interpreter: /")
        .nth(1)
        .and_then(|rest| rest.split(']').next())
        .expect("a dynamic executable")
        .to_owned();
    assert!(files.contains(&loader), "{loader} missing");
    needed.push(loader.rsplit('/').next().unwrap());
    let libraries: Vec<&String> = files
        .iter()
        .filter(|f| f.starts_with("lib") || f.starts_with("usr/lib"))
        .collect();
    let mut names: Vec<&str> = libraries
        .iter()
        .filter_map(|f| f.rsplit('/').next())
        .collect();
    names.sort_unstable();
    needed.sort_unstable();
    needed.dedup();
    assert_eq!(names, needed, "{libraries:?}");
    expected.extend(libraries.iter().map(|f| f.as_str()));
    let mut unexpected: Vec<&String> = files
        .iter()
        .filter(|f| !expected.contains(&f.as_str()) && !added.contains(&f.as_str()))
        .collect();
    unexpected.sort();
    assert!(
        unexpected.is_empty(),
        "the image holds more: {unexpected:?}"
    );
}

/// `docker run` of the image alone: the baked-in configuration and filter load (their
/// metrics appear), as the non-root user.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_envoy_image_runs_its_own_configuration_as_a_non_root_user() {
    let image = format!("{ENVOY_IMAGE}:{VERSION}");
    let container = docker(&["run", "-d", "--rm", "-p", "127.0.0.1::9901", &image])
        .trim()
        .to_owned();
    struct Remove(String);
    impl Drop for Remove {
        fn drop(&mut self) {
            let _ = command("docker", &["rm", "-f", &self.0]).output();
        }
    }
    let _remove = Remove(container.clone());
    let admin = format!(
        "http://{}",
        docker(&["port", &container, "9901"])
            .lines()
            .next()
            .unwrap()
    );

    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ready = fresh_connections()
            .get(format!("{admin}/ready"))
            .send()
            .await;
        if ready.is_ok_and(|r| r.status() == 200) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{}",
            docker(&["logs", &container])
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let stats = fresh_connections()
        .get(format!("{admin}/stats?filter=resilience.demo"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        stats.contains("wasmcustom.resilience.demo.rate_limit.per-client.allowed: 0"),
        "{stats}"
    );
    let top = docker(&["top", &container, "-o", "pid,uid,comm"]);
    let envoy = top
        .lines()
        .find(|l| l.contains("envoy"))
        .expect("envoy runs");
    assert_eq!(envoy.split_whitespace().nth(1), Some("101"), "{top}");
}

/// Debian's docker-registry on a free loopback port, for one test.
struct Registry {
    child: Child,
    address: String,
}

impl Registry {
    fn start(dir: &Path) -> Registry {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let address = format!("127.0.0.1:{port}");
        std::fs::create_dir_all(dir).unwrap();
        let config = dir.join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog: {{level: error, accesslog: {{disabled: true}}}}\nstorage: {{filesystem: {{rootdirectory: {}}}}}\nhttp: {{addr: {address}}}\n",
                dir.join("data").display()
            ),
        )
        .unwrap();
        // Its log (a HEAD before each upload is "blob unknown", at error level) stays in dir.
        let log = std::fs::File::create(dir.join("registry.log")).unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("docker-registry (Debian's docker-registry package; make setup installs it)");
        let registry = Registry { child, address };
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(&registry.address).is_err() {
            assert!(Instant::now() < deadline, "docker-registry did not listen");
            std::thread::sleep(Duration::from_millis(50));
        }
        registry
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn sha256(path: &Path) -> String {
    let out = run(Command::new("sha256sum").arg(path));
    format!("sha256:{}", out.split_whitespace().next().unwrap())
}

fn skopeo(args: &[&str]) -> String {
    let mut all = vec!["--insecure-policy"];
    all.extend_from_slice(args);
    run(&mut command("skopeo", &all))
}

/// An image copied out of the registry as it is stored there (skopeo's `dir:`): the manifest
/// as pushed, and every blob under its digest.
fn pull(registry: &Registry, reference: &str, into: &Path) -> Value {
    skopeo(&[
        "copy",
        "--src-tls-verify=false",
        &format!("docker://{}/{reference}", registry.address),
        &format!("dir:{}", into.display()),
    ]);
    serde_json::from_slice(&std::fs::read(into.join("manifest.json")).unwrap()).unwrap()
}

fn blob(dir: &Path, digest: &Value) -> PathBuf {
    dir.join(digest.as_str().unwrap().trim_start_matches("sha256:"))
}

#[test]
fn both_plugin_forms_go_through_a_registry_and_come_back_byte_for_byte() {
    let wasm = built_wasm();
    let work = std::env::temp_dir().join(format!("resilience-oci-{}", std::process::id()));
    let _scratch = Scratch(work.clone());
    let registry = Registry::start(&work.join("registry"));

    // The OCI artifact: pushed from the layout `make oci` wrote, pulled back by digest.
    let layout = crate::repository().join("target/oci/artifact");
    let index: Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    let built_digest = index["manifests"][0]["digest"].as_str().unwrap().to_owned();
    skopeo(&[
        "copy",
        "--dest-tls-verify=false",
        &format!("oci:{}:{VERSION}", layout.display()),
        &format!("docker://{}/{REPOSITORY}:{VERSION}-oci", registry.address),
    ]);
    let back = work.join("artifact");
    let manifest = pull(&registry, &format!("{REPOSITORY}@{built_digest}"), &back);
    assert_eq!(sha256(&back.join("manifest.json")), built_digest);
    // By tag too; skopeo inspects an artifact only raw (it is no image it could describe).
    let raw = work.join("tagged.json");
    std::fs::write(
        &raw,
        skopeo(&[
            "inspect",
            "--tls-verify=false",
            "--raw",
            &format!("docker://{}/{REPOSITORY}:{VERSION}-oci", registry.address),
        ]),
    )
    .unwrap();
    assert_eq!(sha256(&raw), built_digest);
    // What Istio's fetcher requires of this form: exactly two layers, one of them the raw .wasm.
    let layers = manifest["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 2, "{manifest}");
    let wasm_layer = layers
        .iter()
        .find(|l| l["mediaType"] == "application/vnd.module.wasm.content.layer.v1+wasm")
        .expect("the Wasm layer");
    assert_same_wasm(
        &std::fs::read(blob(&back, &wasm_layer["digest"])).unwrap(),
        &wasm,
    );
    assert_eq!(
        manifest["config"]["mediaType"],
        "application/vnd.module.wasm.config.v1+json"
    );

    // The Docker image: pushed by Docker itself, pulled back as stored.
    let remote = format!("{}/{REPOSITORY}:{VERSION}", registry.address);
    docker(&["tag", &format!("{PLUGIN_IMAGE}:{VERSION}"), &remote]);
    let _untag = Untag(remote.clone());
    let pushed = docker(&["push", &remote]);
    let pushed_digest = pushed
        .split_whitespace()
        .skip_while(|w| *w != "digest:")
        .nth(1)
        .unwrap_or_else(|| panic!("no digest in {pushed}"))
        .to_owned();
    let back = work.join("image");
    let manifest = pull(&registry, &format!("{REPOSITORY}@{pushed_digest}"), &back);
    assert_eq!(sha256(&back.join("manifest.json")), pushed_digest);
    // Istio reads the last layer, a gzipped tar, and takes the file named plugin.wasm: of a
    // Docker manifest (what Docker's classic builder pushes) or of an OCI one (BuildKit's).
    let layer_type = match manifest["mediaType"].as_str() {
        Some("application/vnd.docker.distribution.manifest.v2+json") => {
            "application/vnd.docker.image.rootfs.diff.tar.gzip"
        }
        Some("application/vnd.oci.image.manifest.v1+json") => {
            "application/vnd.oci.image.layer.v1.tar+gzip"
        }
        other => panic!("Docker pushed a {other:?}, which is no image manifest: {manifest}"),
    };
    let last = manifest["layers"].as_array().unwrap().last().unwrap();
    assert_eq!(last["mediaType"], layer_type);
    let extracted = work.join("extracted");
    std::fs::create_dir_all(&extracted).unwrap();
    run(Command::new("tar")
        .arg("-xzf")
        .arg(blob(&back, &last["digest"]))
        .arg("-C")
        .arg(&extracted));
    assert_same_wasm(
        &std::fs::read(extracted.join("plugin.wasm")).unwrap(),
        &wasm,
    );
}

/// Byte for byte, without printing two .wasm files when they differ.
fn assert_same_wasm(read_back: &[u8], built: &[u8]) {
    assert!(
        read_back == built,
        "the .wasm read back ({} bytes) is not the one built ({} bytes): were the images built \
         from this build? (`make docker-test` builds them first)",
        read_back.len(),
        built.len()
    );
}

/// Removes a tag, also when the test fails.
struct Untag(String);

impl Drop for Untag {
    fn drop(&mut self) {
        let _ = command("docker", &["rmi", &self.0]).output();
    }
}

/// Removes a directory, also when the test fails.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
