//! The binary refuses an invalid configuration with status 64 and one line,
//! before binding any port (SPEC §4).

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

fn assert_config_error(args: &[&str], env: &[(&str, &str)], contains: &str) {
    let (code, stderr) = run(args, env);
    assert_eq!(code, Some(64), "stderr: {stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {stderr:?}");
    assert!(
        stderr.contains(contains),
        "{stderr:?} should contain {contains:?}"
    );
}

#[test]
fn invalid_configurations_exit_64_with_one_line() {
    assert_config_error(&["--shards", "0"], &[], "`shards`");
    assert_config_error(&["--listen", "not-an-address"], &[], "listen");
    assert_config_error(&["--no-such-flag"], &[], "no-such-flag");
    assert_config_error(&["--peer", "eu=localhost"], &[], "peers");
    assert_config_error(&[], &[("FRESHNESS_SHARDS", "0")], "`shards`");
    let dir = std::env::temp_dir().join(format!("freshness-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("hub.toml");
    std::fs::write(&file, "shards = 8\nunknown_key = 1\n").unwrap();
    assert_config_error(
        &["--config", file.to_str().unwrap()],
        &[],
        "unknown field `unknown_key`",
    );
    assert_config_error(
        &["--config", "/nonexistent/hub.toml"],
        &[],
        "cannot read config file",
    );
}

#[test]
fn an_invalid_configuration_binds_no_port() {
    // Occupy nothing; ask for a port and an invalid value: the error must be
    // the value, not the address (validation precedes binding).
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    assert_config_error(&["--listen", &addr, "--shards", "0"], &[], "`shards`");
}
