//! Archives as real tools write them, through the service: `cella serve` and `cella scan` as
//! real processes, a real (jailed, as root) microVM. Zips from Python's `zipfile` (a deflated
//! license text, the case once refused as "truncated"), from Info-ZIP `zip` written to a file
//! and streamed to a pipe (data descriptors), and a GNU tar of a sparse file: each is read
//! whole and its findings come back at their paths and lines.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use sqlx::PgPool;

mod common;
#[path = "../../guest/scan/tests/sarif_checks/mod.rs"]
mod sarif_checks;

use common::{cella, serve_jailed, tenant_key, test_db_url, Scratch};
use sarif_checks::checked_sarif;

const MIT: &str = "Permission is hereby granted, free of charge, to any person obtaining a copy
of this software and associated documentation files (the \"Software\"), to deal
in the Software without restriction, including without limitation the rights
to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
copies of the Software, and to permit persons to whom the Software is
furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all
copies or substantial portions of the Software.

THE SOFTWARE IS PROVIDED \"AS IS\", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE
SOFTWARE.
";

const KEY: &str = "STRIPE_KEY=sk_live_7cQ21LmNpkRXbtwuE4zdf3Ha\n";

fn text(o: &Output) -> String {
    format!("{}\n{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn run(cmd: &mut Command) -> Vec<u8> {
    let o = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(o.status.success(), "{cmd:?}: {}", text(&o));
    o.stdout
}

/// Each result of the rules that matter here as `uri:line:rule`, sorted.
fn found(sarif: &Path) -> Vec<String> {
    let log = checked_sarif(sarif);
    let mut out: Vec<String> = log["runs"][0]["results"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["ruleId"] == "stripe-secret-key" || r["ruleId"] == "license-text")
        .map(|r| {
            let loc = &r["locations"][0]["physicalLocation"];
            format!(
                "{}:{}:{}",
                loc["artifactLocation"]["uri"].as_str().unwrap(),
                loc["region"]["startLine"],
                r["ruleId"].as_str().unwrap()
            )
        })
        .collect();
    out.sort();
    out
}

#[sqlx::test(migrations = "../migrations")]
async fn zips_of_several_writers_and_a_sparse_tar_are_read_whole_through_the_service(pool: PgPool) {
    let dir = Scratch::new("writers-e2e");
    let server = serve_jailed(&dir.join("data"), &test_db_url(&pool));
    let data = server.data.clone();
    let key = tenant_key(&data, "writers");
    let src = dir.join("src");
    std::fs::create_dir_all(src.join("app")).unwrap();
    std::fs::write(src.join("LICENSE"), MIT).unwrap();
    std::fs::write(src.join("app/pay.env"), format!("# payments\n{KEY}")).unwrap();

    // Python's zipfile, deflated.
    let py = dir.join("python.zip");
    let program = "import sys, zipfile\n\
        with zipfile.ZipFile(sys.argv[1], 'w', zipfile.ZIP_DEFLATED) as z:\n\
        \x20   z.write(sys.argv[2] + '/LICENSE', 'LICENSE')\n\
        \x20   z.write(sys.argv[2] + '/app/pay.env', 'app/pay.env')\n";
    run(Command::new("python3").args(["-c", program, py.to_str().unwrap(), src.to_str().unwrap()]));
    // Info-ZIP, to a file; and streamed to a pipe, which makes it write data descriptors.
    let infozip = dir.join("infozip.zip");
    run(Command::new("zip").current_dir(&src).args(["-q", "-r", infozip.to_str().unwrap(), "."]));
    let streamed =
        run(Command::new("zip").current_dir(&src).args(["-q", "-r", "-", "."]).stdout(Stdio::piped()));
    let descriptors = streamed.windows(8).filter(|w| w[..4] == *b"PK\x03\x04" && w[6] & 0x08 != 0).count();
    assert!(descriptors >= 2, "the streamed zip's files have data descriptors (flag bit 3)");
    let streamed_path = dir.join("streamed.zip");
    std::fs::write(&streamed_path, &streamed).unwrap();
    // GNU tar of a sparse file: 64 MiB with the key 40 MiB in (a hole before it).
    let sparse = src.join("disk.img");
    let mut f = std::fs::File::create(&sparse).unwrap();
    f.set_len(64 << 20).unwrap();
    use std::os::unix::fs::FileExt;
    f.write_at(KEY.as_bytes(), 40 << 20).unwrap();
    f.flush().unwrap();
    let tarball = dir.join("sparse.tar");
    run(Command::new("tar").current_dir(&src).args([
        "--sparse",
        "-cf",
        tarball.to_str().unwrap(),
        "disk.img",
    ]));
    assert!(std::fs::metadata(&tarball).unwrap().len() < 1 << 20, "GNU tar stored the file sparse");

    for (artifact, want) in [
        (&py, vec!["LICENSE:1:license-text", "app/pay.env:2:stripe-secret-key"]),
        (&infozip, vec!["LICENSE:1:license-text", "app/pay.env:2:stripe-secret-key"]),
        (&streamed_path, vec!["LICENSE:1:license-text", "app/pay.env:2:stripe-secret-key"]),
        (&tarball, vec!["disk.img:1:stripe-secret-key"]),
    ] {
        let sarif = dir.join("out.sarif");
        let _ = std::fs::remove_file(&sarif);
        let o = cella(
            &data,
            Some(&key),
            &["scan", artifact.to_str().unwrap(), "--sarif", sarif.to_str().unwrap()],
        );
        assert_eq!(o.status.code(), Some(1), "{}: {}", artifact.display(), text(&o));
        assert!(!text(&o).contains("skipped"), "{}: {}", artifact.display(), text(&o));
        assert_eq!(found(&sarif), want, "{}: {}", artifact.display(), text(&o));
    }
}
