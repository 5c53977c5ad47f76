//! Real client drivers (psycopg 3, psycopg2, asyncpg) through shardgate,
//! compared with the same operations directly against Postgres:
//! tests/drivers/check_drivers.py. The Python packages are installed with
//! pip from tests/drivers/requirements.txt when missing.

mod common;

use common::*;
use std::process::Command;

fn ensure_python_drivers() {
    let have = Command::new("python3")
        .args(["-c", "import psycopg, psycopg2, asyncpg"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !have {
        let req = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/drivers/requirements.txt"
        );
        let status = Command::new("python3")
            .args(["-m", "pip", "install", "-q", "-r", req])
            .status()
            .expect("python3 with pip");
        assert!(status.success(), "pip install -r {req} failed");
    }
}

#[test]
fn python_drivers_behave_as_against_postgres() {
    ensure_python_drivers();
    let c = cluster();
    let p = start_proxy("max_size = 4\ncheckout_timeout = \"10s\"", "");
    let out = Command::new("python3")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/drivers/check_drivers.py"
        ))
        .args(["--dsn-proxy", &p.url("app", "app", "app")])
        .args([
            "--dsn-direct",
            &format!(
                "host=127.0.0.1 port={} user=app password=app dbname=app",
                c.primary.port
            ),
        ])
        .output()
        .expect("run check_drivers.py");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "driver checks failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains(" passed, 0 failed"), "{stdout}");
}
