//! The binary refuses an invalid configuration with status 64 and one line
//! naming the source (file and line, environment variable or flag), the key,
//! the value and what is expected, before binding any port (SPEC §4).

use std::process::Command;

fn run(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_freshness-hub"));
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run freshness-hub");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Exit 64 and exactly this line on stderr.
fn assert_config_error(args: &[&str], env: &[(&str, &str)], line: &str) {
    let (code, stderr) = run(args, env);
    assert_eq!(code, Some(64), "stderr: {stderr}");
    assert_eq!(stderr, format!("freshness-hub: {line}\n"));
}

/// A config file with `text`, in a directory that lives as long as the guard.
fn config_file(text: &str) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("hub.toml");
    std::fs::write(&file, text).unwrap();
    let path = file.to_str().unwrap().to_owned();
    (dir, path)
}

#[test]
fn invalid_configurations_exit_64_with_one_line_naming_source_key_value_and_expectation() {
    assert_config_error(
        &["--shards", "0"],
        &[],
        "flag --shards: shards = 0: expected a whole number from 1 to 65536",
    );
    assert_config_error(
        &["--listen", "not-an-address"],
        &[],
        "flag --listen: listen = \"not-an-address\": expected an address like 127.0.0.1:50051",
    );
    assert_config_error(
        &["--no-such-flag"],
        &[],
        "unexpected argument '--no-such-flag' found",
    );
    assert_config_error(
        &["--peer", "eu=localhost"],
        &[],
        "flag --peer: peers.eu = \"localhost\": expected a URL like http://host:port (starting with http:// or https://, with a host and a port)",
    );
    assert_config_error(
        &[],
        &[("FRESHNESS_SHARDS", "0")],
        "environment variable FRESHNESS_SHARDS: shards = 0: expected a whole number from 1 to 65536",
    );
    assert_config_error(
        &[],
        &[("FRESHNESS_METRICS_LISTEN", "nowhere")],
        "environment variable FRESHNESS_METRICS_LISTEN: metrics_listen = \"nowhere\": expected an address like 127.0.0.1:9464",
    );
    let (_dir, path) = config_file("shards = 8\nunknown_key = 1\n");
    assert_config_error(
        &["--config", &path],
        &[],
        &format!("config file {path}, line 2: unknown_key = 1: unknown key"),
    );
    let (_dir, path) = config_file("shard = 8\n");
    assert_config_error(
        &["--config", &path],
        &[],
        &format!("config file {path}, line 1: shard = 8: unknown key (did you mean shards?)"),
    );
    let (_dir, path) = config_file("shards = \"x\"\n");
    assert_config_error(
        &["--config", &path],
        &[],
        &format!(
            "config file {path}, line 1: shards = \"x\": expected a whole number from 1 to 65536"
        ),
    );
    let (code, stderr) = run(&["--config", "/nonexistent/hub.toml"], &[]);
    assert_eq!(code, Some(64));
    assert!(
        stderr.starts_with("freshness-hub: cannot read config file /nonexistent/hub.toml: "),
        "{stderr}"
    );
}

#[test]
fn listen_and_metrics_listen_in_a_file_are_told_apart() {
    for key in ["listen", "metrics_listen"] {
        let (_dir, path) = config_file(&format!("region = \"eu\"\n\n{key} = \"nowhere\"\n"));
        let like = if key == "listen" {
            "127.0.0.1:50051"
        } else {
            "127.0.0.1:9464"
        };
        assert_config_error(
            &["--config", &path],
            &[],
            &format!(
                "config file {path}, line 3: {key} = \"nowhere\": expected an address like {like}"
            ),
        );
    }
}

#[test]
fn an_invalid_configuration_binds_no_port() {
    // The gRPC port is taken: a hub that bound before validating would fail
    // on the address (exit 1), not on the value (exit 64).
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let (_dir, path) = config_file(&format!(
        "listen = \"{addr}\"\nmetrics_listen = \"nowhere\"\n"
    ));
    assert_config_error(
        &["--config", &path, "--ephemeral"],
        &[],
        &format!(
            "config file {path}, line 2: metrics_listen = \"nowhere\": expected an address like 127.0.0.1:9464"
        ),
    );
    assert_config_error(
        &["--listen", &addr, "--shards", "0"],
        &[],
        "flag --shards: shards = 0: expected a whole number from 1 to 65536",
    );
}

#[test]
fn logs_to_a_pipe_carry_no_escape_sequences() {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
    let mut child = Command::new(env!("CARGO_BIN_EXE_freshness-hub"))
        .args([
            "--ephemeral",
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
        ])
        .env_remove("NO_COLOR")
        .env("TERM", "xterm-256color")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start freshness-hub");
    let stderr = child.stderr.take().unwrap();
    let mut seen = Vec::new();
    for line in BufReader::new(stderr).split(b'\n') {
        let line = line.unwrap();
        let serving = String::from_utf8_lossy(&line).contains("hub serving");
        seen.push(line);
        if serving {
            break;
        }
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        seen.iter()
            .any(|l| String::from_utf8_lossy(l).contains("hub serving")),
        "the hub logged its start: {seen:?}"
    );
    for line in &seen {
        assert!(
            !line.contains(&0x1b),
            "an escape byte in {:?}",
            String::from_utf8_lossy(line)
        );
    }
}
