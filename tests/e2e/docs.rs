//! Issue 16: what the documents show runs as written in real Envoy and answers as they say.
//! Filter entries are taken from the Markdown's YAML snippets verbatim (only the `.wasm` path
//! is pointed at the fresh build); documented responses are compared line by line.

use super::envoy::envoy;
use super::fresh_connections;
use super::markdown::{fenced_blocks, markdown_files};
use super::upstream::Upstream;
use reqwest::Response;
use serde_json::Value;
use std::path::Path;

fn markdown(path: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(path)).unwrap()
}

/// The document from `marker` on.
fn from<'a>(text: &'a str, marker: &str) -> &'a str {
    let at = text
        .find(marker)
        .unwrap_or_else(|| panic!("{marker:?} is not in the document"));
    &text[at..]
}

/// The first fenced block after `marker`.
fn block_after<'a>(text: &'a str, marker: &str) -> &'a str {
    fenced_blocks(from(text, marker))[0].1
}

/// Every Wasm filter entry (`name: envoy.filters.http.wasm`) in the YAML snippets.
fn wasm_entries(text: &str) -> Vec<Value> {
    fn find(value: &Value, found: &mut Vec<Value>) {
        match value {
            Value::Object(map)
                if map.get("name") == Some(&Value::from("envoy.filters.http.wasm")) =>
            {
                found.push(value.clone());
            }
            Value::Object(map) => map.values().for_each(|v| find(v, found)),
            Value::Array(items) => items.iter().for_each(|v| find(v, found)),
            _ => {}
        }
    }
    let mut found = Vec::new();
    for (info, body) in fenced_blocks(text) {
        if let ("yaml", Ok(value)) = (info, serde_norway::from_str::<Value>(body)) {
            find(&value, &mut found);
        }
    }
    found
}

/// A `name: value` line as shown, without a `pk` value (each Envoy hashes with its own seed).
fn shown(line: &str) -> String {
    let mut out = String::new();
    let mut rest = line;
    while let Some(at) = rest.find(";pk=:") {
        out.push_str(&rest[..at]);
        out.push_str(";pk=:…:");
        let after = &rest[at + ";pk=:".len()..];
        rest = after.split_once(':').map_or("", |(_, tail)| tail);
    }
    out + rest
}

/// The response's headers named in `expected` (`name: value` lines, after the status line),
/// each as the document would show it.
fn compare_headers(response: &Response, expected: &[&str]) {
    for line in expected {
        let (name, _) = line.split_once(": ").unwrap();
        let actual: Vec<String> = response
            .headers()
            .get_all(name)
            .iter()
            .map(|v| shown(&format!("{name}: {}", v.to_str().unwrap())))
            .collect();
        assert_eq!(actual, [shown(line)], "{name}, once");
    }
}

/// Without its `# comment`.
fn uncommented(line: &str) -> &str {
    line.split_once("  #")
        .map_or(line, |(kept, _)| kept)
        .trim_end()
}

fn status_of(line: &str) -> u16 {
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn every_documented_filter_entry_loads_in_envoy_and_lets_requests_through() {
    let upstream = Upstream::start().await;
    let mut loaded = 0;
    for path in markdown_files() {
        let doc = path.display();
        for entry in wasm_entries(&std::fs::read_to_string(&path).unwrap()) {
            let envoy = envoy().documented_filter(&entry).start(&upstream).await;
            let before = upstream.count();
            let response = fresh_connections()
                .get(envoy.url("/"))
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 200, "{doc}");
            assert_eq!(upstream.count(), before + 1, "{doc}");
            loaded += 1;
        }
    }
    assert_eq!(loaded, 5, "every snippet with a filter entry");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_rate_limit_worked_example_refuses_as_documented() {
    let doc = markdown("filters/rate_limit/README.md");
    let upstream = Upstream::start().await;
    let envoy = envoy()
        .documented_filter(&wasm_entries(&doc)[0])
        .start(&upstream)
        .await;
    let client = fresh_connections();
    let mut refused = None;
    for _ in 0..60 {
        let response = client.get(envoy.url("/")).send().await.unwrap();
        if response.status() != 200 {
            refused = Some(response);
            break;
        }
    }
    let refused = refused.expect("the per-client rule refuses within 60 requests");
    let shown_response: Vec<&str> = block_after(&doc, "A refused request never reaches")
        .lines()
        .filter(|line| !line.is_empty())
        .collect();
    assert_eq!(refused.status().as_u16(), status_of(shown_response[0]));
    compare_headers(&refused, &shown_response[1..]);
    let body: Value = serde_json::from_slice(&refused.bytes().await.unwrap()).unwrap();
    let shown_body: Value =
        serde_json::from_str(block_after(&doc, "The body is an RFC 9457 problem")).unwrap();
    assert_eq!(body, shown_body);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_idempotency_walkthrough_answers_as_documented() {
    let doc = markdown("filters/idempotency/README.md");
    let upstream = Upstream::start().await;
    upstream.set_status(201);
    let envoy = envoy()
        .documented_filter(&wasm_entries(&doc)[0])
        .start(&upstream)
        .await;
    let session = block_after(&doc, "```console");
    let session = session.split("\n$ ").map(|s| s.trim_start_matches("$ "));
    let mut compared = 0;
    for exchange in session.filter(|s| s.starts_with("curl")) {
        let mut lines = exchange.lines();
        let command = lines.next().unwrap();
        // curl -si -X POST -H 'a: b' -d '...' http://envoy/path: quoted arguments alternate
        // with what precedes them.
        let parts: Vec<&str> = command.split('\'').collect();
        let path = parts
            .last()
            .unwrap()
            .trim()
            .trim_start_matches("http://envoy");
        let mut request = fresh_connections().post(envoy.url(path));
        for pair in parts.windows(2).step_by(2) {
            let (flag, argument) = (pair[0].trim_end(), pair[1]);
            if flag.ends_with("-H") {
                let (name, value) = argument.split_once(": ").unwrap();
                request = request.header(name, value);
            } else if flag.ends_with("-d") {
                request = request.body(argument.to_owned());
            }
        }
        let response = request.send().await.unwrap();
        let shown_lines: Vec<&str> = lines.map(uncommented).filter(|l| !l.is_empty()).collect();
        assert_eq!(
            response.status().as_u16(),
            status_of(shown_lines[0]),
            "{command}"
        );
        compare_headers(&response, &shown_lines[1..]);
        compared += 1;
    }
    assert_eq!(compared, 3);
    assert_eq!(upstream.count(), 1, "executed once, as the document says");
}

/// Issue 16: `make run`'s printed walkthrough, run as printed. Its load-shedding lines used to
/// send the `critical` request after the slow ones had ended, which showed nothing; now six
/// slow normal requests fill the pool's normal share (3 in flight, 3 shed) while the
/// critical one takes the fourth slot.
#[tokio::test(flavor = "multi_thread")]
async fn the_demo_walkthrough_sheds_and_admits_as_printed() {
    use std::os::unix::process::CommandExt;
    use std::process::{Child, Command, Stdio};

    /// Stops the demo (bash, Envoy, the gRPC server: the script's process group) however the
    /// test ends, so nothing keeps its fixed ports.
    struct Running(Child);
    impl Drop for Running {
        fn drop(&mut self) {
            let _ = Command::new("kill")
                .args(["--", &format!("-{}", self.0.id())])
                .status();
            let _ = self.0.wait();
        }
    }

    // demo.yaml's fixed ports: another demo (a `make run`) would answer in place of this one.
    for port in [9901, 10000, 10001, 10002] {
        assert!(
            std::net::TcpListener::bind(("127.0.0.1", port)).is_ok(),
            "port {port} is taken: is `make run` running?"
        );
    }
    let root = super::envoy::repo_root();
    let mut demo = Command::new("bash")
        .arg("envoy/demo.sh")
        .current_dir(root)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .expect("envoy/demo.sh");
    let stdout = demo.stdout.take().unwrap();
    let demo = Running(demo);
    // The walkthrough is printed once Envoy is ready; read it up to its last line.
    let printed = tokio::task::spawn_blocking(move || {
        use std::io::BufRead;
        let mut text = String::new();
        for line in std::io::BufReader::new(stdout).lines() {
            let line = line.unwrap();
            let done = line.starts_with("Ctrl-C stops Envoy");
            text.push_str(&line);
            text.push('\n');
            if done {
                break;
            }
        }
        text
    })
    .await
    .unwrap();
    let section: Vec<&str> = printed
        .split("\n\n")
        .find(|part| part.trim_start().starts_with("# load shedding"))
        .expect("a load-shedding section")
        .lines()
        .filter(|line| !line.trim_start().starts_with('#'))
        .collect();
    let output = Command::new("timeout")
        .args(["30", "bash", "-c", &section.join("\n")])
        .output()
        .expect("bash");
    drop(demo);
    let output = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(output.contains("critical: 200"), "{output}");
    let normal = output.replace("critical: 200", "");
    let statuses: Vec<&str> = normal
        .split_whitespace()
        .filter(|word| word.len() == 3 && word.bytes().all(|b| b.is_ascii_digit()))
        .collect();
    assert_eq!(
        (
            statuses.iter().filter(|s| **s == "200").count(),
            statuses.iter().filter(|s| **s == "503").count()
        ),
        (3, 3),
        "six slow normal requests: three in flight, three shed: {output}"
    );
}

/// The text the document quotes in backticks right after `marker`.
fn quoted_after<'a>(text: &'a str, marker: &str) -> &'a str {
    from(text, marker).split('`').nth(1).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_circuit_breaker_worked_example_opens_and_logs_as_documented() {
    let doc = markdown("filters/circuit_breaker/README.md");
    let upstream = Upstream::start().await;
    upstream.set_status(503);
    let envoy = envoy()
        .documented_filter(&wasm_entries(&doc)[0])
        .named_cluster("payments")
        .start(&upstream)
        .await;
    let client = fresh_connections();
    for _ in 0..5 {
        let failed = client
            .get(envoy.url("/payments/charge"))
            .send()
            .await
            .unwrap();
        assert_eq!(failed.status(), 503);
    }
    assert_eq!(upstream.count(), 5);
    let refused = client
        .get(envoy.url("/payments/charge"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        refused
            .headers()
            .get("x-circuit-breaker")
            .map(|v| v.to_str().unwrap()),
        Some("payments"),
        "\"Calls routed to the payments cluster trip the breaker after 5 failures in a row\""
    );
    assert_eq!(upstream.count(), 5);
    let line = quoted_after(
        &doc,
        "Each transition is logged once, at info, with its reason",
    );
    assert!(
        envoy.log().contains(line),
        "{line:?} not in:\n{}",
        envoy.log()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_load_shedding_worked_example_sheds_as_documented() {
    let doc = markdown("filters/load_shedding/README.md");
    let upstream = Upstream::start().await;
    // Long enough that all 170 are in before the first is answered, on a busy machine too.
    upstream.set_delay(std::time::Duration::from_millis(4_000));
    let envoy = envoy()
        .documented_filter(&wasm_entries(&doc)[0])
        .named_cluster("search")
        .start(&upstream)
        .await;
    // "a slow search backend fills its own 200 slots and is shed there": normal requests
    // from 160 in flight (80%).
    let url = envoy.url("/search/q");
    let requests: Vec<_> = (0..170)
        .map(|_| {
            let request = fresh_connections().get(&url).send();
            async move { request.await.unwrap() }
        })
        .collect();
    let responses = super::join_all(requests).await;
    let shed: Vec<&Response> = responses.iter().filter(|r| r.status() == 503).collect();
    assert_eq!(
        responses.len() - shed.len(),
        160,
        "admitted up to 80% of 200"
    );
    let shown_response: Vec<&str> = block_after(&doc, "A shed request gets, at once:")
        .lines()
        .filter(|line| !line.is_empty())
        .collect();
    for response in shed {
        assert_eq!(response.status().as_u16(), status_of(shown_response[0]));
        compare_headers(response, &shown_response[1..]);
    }
}
