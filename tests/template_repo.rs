//! Signed template repositories through the CLI, served by a small HTTP server (with
//! range requests) that the test runs on 127.0.0.1: install, incremental upgrade,
//! downgrade, reinstall, resume, and every refusal with the pool left untouched.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use e2e_tests::{pattern, Ctl};
use serde_json::Value;

/// Serves `dir` over HTTP/1.1 GET with `Range: bytes=A-B`. Counts body bytes sent; when
/// `cut_after` is non-zero, the next response is cut after that many body bytes.
struct Server {
    url: String,
    sent: Arc<AtomicU64>,
    cut_after: Arc<AtomicU64>,
}

impl Server {
    fn start(dir: &Path) -> Server {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", l.local_addr().unwrap());
        let sent = Arc::new(AtomicU64::new(0));
        let cut_after = Arc::new(AtomicU64::new(0));
        let (d, s, c) = (dir.to_path_buf(), sent.clone(), cut_after.clone());
        std::thread::spawn(move || {
            for conn in l.incoming().flatten() {
                let (d, s, c) = (d.clone(), s.clone(), c.clone());
                std::thread::spawn(move || {
                    let _ = serve(conn, &d, &s, &c);
                });
            }
        });
        Server {
            url,
            sent,
            cut_after,
        }
    }
}

fn serve(conn: TcpStream, dir: &Path, sent: &AtomicU64, cut: &AtomicU64) -> std::io::Result<()> {
    let mut r = BufReader::new(conn.try_clone()?);
    let mut w = conn;
    loop {
        let mut line = String::new();
        if r.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
        let mut range = None;
        loop {
            let mut h = String::new();
            r.read_line(&mut h)?;
            if h.trim().is_empty() {
                break;
            }
            if let Some(v) = h.to_ascii_lowercase().strip_prefix("range: bytes=") {
                let (a, b) = v.trim().split_once('-').unwrap();
                range = Some((a.parse::<u64>().unwrap(), b.parse::<u64>().ok()));
            }
        }
        let file = dir.join(path.trim_start_matches('/'));
        let Ok(data) = std::fs::read(&file) else {
            w.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")?;
            continue;
        };
        let total = data.len() as u64;
        let (status, body, extra) = match range {
            Some((a, b)) => {
                let e = b.unwrap_or(total - 1).min(total - 1);
                (
                    "206 Partial Content",
                    &data[a as usize..=e as usize],
                    format!("Content-Range: bytes {a}-{e}/{total}\r\n"),
                )
            }
            None => ("200 OK", &data[..], String::new()),
        };
        write!(
            w,
            "HTTP/1.1 {status}\r\nContent-Length: {}\r\n{extra}\r\n",
            body.len()
        )?;
        let c = cut.load(Ordering::SeqCst);
        if c > 0 && (c as usize) < body.len() {
            cut.store(0, Ordering::SeqCst);
            w.write_all(&body[..c as usize])?;
            sent.fetch_add(c, Ordering::SeqCst);
            return Ok(());
        }
        w.write_all(body)?;
        sent.fetch_add(body.len() as u64, Ordering::SeqCst);
    }
}

/// A publisher with a key and an empty repository, and a client (pool, trusted key,
/// repository as a source), and images of two versions of template "deb".
struct Setup {
    publisher: Ctl,
    client: Ctl,
    repo: PathBuf,
    key: PathBuf,
    server: Server,
    v1: Vec<u8>,
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Image of a template with some zeros and repeats; version 2 changes `changed` bytes
/// spread over a few places.
fn image(version: u8) -> Vec<u8> {
    let mut d = pattern(7, 32 << 20);
    d[20 << 20..24 << 20].fill(0);
    if version >= 2 {
        for k in 0..4usize {
            let at = (k * 7 + 3) << 20;
            d[at..at + (96 << 10)].copy_from_slice(&pattern(100 + k as u64, 96 << 10));
        }
    }
    d
}

impl Setup {
    fn new() -> Setup {
        let publisher = Ctl::new();
        publisher.ok(&["pool", "init", "--size", "1G"]);
        let key = publisher.root.join("pub.key");
        let repo = publisher.root.join("repo");
        publisher.ok(&["template", "repo", "keygen", s(&key)]);
        publisher.ok(&["template", "repo", "init", s(&repo), "--key", s(&key)]);
        let v1 = image(1);
        let st = Setup {
            server: Server::start(&repo),
            client: Ctl::new(),
            publisher,
            repo,
            key,
            v1,
        };
        st.publish("1.0", &st.v1.clone());
        st.client.ok(&["pool", "init", "--size", "2G"]);
        let pubkey = PathBuf::from(format!("{}.pub", s(&st.key)));
        st.client.ok(&["template", "repo", "trust", s(&pubkey)]);
        st.client
            .ok(&["template", "repo", "add-source", &st.server.url]);
        st
    }

    /// Publishes `img` as template "deb" version `version`; returns the package path.
    fn publish(&self, version: &str, img: &[u8]) -> PathBuf {
        let p = &self.publisher;
        let f = p.root.join(format!("deb-{version}.img"));
        std::fs::write(&f, img).unwrap();
        let _ = p.output(&["template", "remove", "deb"]);
        p.ok(&["template", "create", "deb", "--from-image", s(&f)]);
        let pkg = p.root.join(format!("deb-{version}.qtpl"));
        p.ok(&["template", "export", "deb", s(&pkg)]);
        p.ok(&[
            "template",
            "repo",
            "add",
            s(&self.repo),
            s(&pkg),
            "--key",
            s(&self.key),
            "--version",
            version,
        ]);
        pkg
    }

    fn pool_state(&self) -> (Value, Value) {
        let i = self.client.json(&["pool", "info"]);
        (i["data_used"].clone(), i["volumes"].clone())
    }

    /// `args` must fail with a message containing `want`, leaving the pool as it was.
    fn refused(&self, args: &[&str], want: &str) -> String {
        let before = self.pool_state();
        let err = self.client.fails(args);
        assert!(
            err.to_lowercase().contains(&want.to_lowercase()),
            "{args:?}: expected {want:?} in: {err}"
        );
        assert_eq!(before, self.pool_state(), "the pool changed: {err}");
        err
    }

    fn package_file(&self) -> PathBuf {
        self.repo.join("packages/deb-1.0.qtpl")
    }

    /// Edits the index as a (careless or hostile) publisher would, and re-signs it.
    fn resign_with(&self, f: impl FnOnce(&mut Value)) {
        let p = self.repo.join("index.json");
        let mut idx: Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
        f(&mut idx);
        std::fs::write(&p, serde_json::to_vec(&idx).unwrap()).unwrap();
        self.publisher.ok(&[
            "template",
            "repo",
            "resign",
            s(&self.repo),
            "--key",
            s(&self.key),
        ]);
    }
}

fn fp(data: &[u8]) -> String {
    blake3::hash(data).to_hex().to_string()
}

#[test]
fn install_upgrade_downgrade_reinstall_fetch_only_what_changed() {
    let st = Setup::new();
    let c = &st.client;
    let list = c.json(&["template", "list", "--available"]);
    assert_eq!(list[0]["name"], "deb", "{list}");
    assert_eq!(list[0]["version"], "1.0", "{list}");
    let info = c.json(&["template", "info", "deb", "--available"]);
    assert_eq!(info["available"][0]["version"], "1.0", "{info}");

    let v = c.json(&["template", "install", "deb"]);
    assert_eq!(v["fingerprint"], fp(&st.v1).as_str(), "{v}");
    let full = v["transfer"]["fetched_bytes"].as_u64().unwrap();
    assert!(full > 0, "{v}");

    let v2 = image(2);
    let pkg2 = st.publish("2.0", &v2);
    let pkg2_size = std::fs::metadata(&pkg2).unwrap().len();
    let sent0 = st.server.sent.load(Ordering::SeqCst);
    let u = c.json(&["template", "upgrade", "deb"]);
    assert_eq!(u["fingerprint"], fp(&v2).as_str(), "{u}");
    assert_eq!(u["version"], "2.0", "{u}");
    let fetched = u["transfer"]["fetched_bytes"].as_u64().unwrap();
    let served = st.server.sent.load(Ordering::SeqCst) - sent0;
    // 4 x 96 KiB changed: at most 8 package chunks (and the manifest) move.
    assert!(
        fetched * 5 < pkg2_size,
        "fetched {fetched} of a {pkg2_size}-byte package: {u}"
    );
    assert!(
        served >= fetched,
        "server sent {served}, client counted {fetched}"
    );
    assert!(
        u["transfer"]["pool_bytes_added"].as_u64().unwrap() < 4 << 20,
        "unchanged chunks are shared in the pool: {u}"
    );
    let again = c.json(&["template", "upgrade", "deb"]);
    assert_eq!(again["up_to_date"], true, "{again}");

    // The root holds the new bytes.
    let out = c.root.join("root.img");
    c.ok(&["volume", "export", "deb:root", s(&out)]);
    assert!(std::fs::read(&out).unwrap() == v2);

    c.fails(&["template", "downgrade", "deb"]);
    let d = c.json(&["template", "downgrade", "deb", "--allow-downgrade"]);
    assert_eq!(d["fingerprint"], fp(&st.v1).as_str(), "{d}");
    let r = c.json(&["template", "reinstall", "deb"]);
    assert_eq!(r["version"], "1.0", "{r}");
    let refetched = r["transfer"]["fetched_bytes"].as_u64().unwrap();
    assert!(
        refetched * 5 < pkg2_size,
        "a reinstall reuses intact chunks: {r}"
    );
    assert_eq!(c.json(&["pool", "verify"])["clean"], true);

    // A local directory is a repository too; NAME-VERSION picks a version.
    let c2 = Ctl::new();
    c2.ok(&["pool", "init", "--size", "1G"]);
    let pubkey = PathBuf::from(format!("{}.pub", s(&st.key)));
    c2.ok(&["template", "repo", "trust", s(&pubkey)]);
    let l = c2.json(&["template", "install", "deb-1.0", "--repo", s(&st.repo)]);
    assert_eq!(l["fingerprint"], fp(&st.v1).as_str(), "{l}");
}

#[test]
fn interrupted_download_resumes() {
    let st = Setup::new();
    let size = std::fs::metadata(st.package_file()).unwrap().len();
    st.server.cut_after.store(size / 2, Ordering::SeqCst);
    // The manifest request is small; cut the data request instead.
    let c = &st.client;
    let mut cut_hit = false;
    for _ in 0..3 {
        let out = c.output(&["--format", "json", "template", "install", "deb"]);
        if out.status.success() {
            let v: Value = serde_json::from_slice(&out.stdout).unwrap();
            assert!(cut_hit, "the first attempt must have been cut: {v}");
            let fetched = v["transfer"]["fetched_bytes"].as_u64().unwrap();
            assert!(
                fetched < size * 3 / 4,
                "resumed: fetched {fetched} of {size}"
            );
            assert_eq!(v["fingerprint"], fp(&st.v1).as_str());
            return;
        }
        cut_hit = true;
        assert!(c.fails(&["template", "info", "deb"]).contains("deb"));
    }
    panic!("never completed");
}

#[test]
fn bad_signature_is_refused() {
    let st = Setup::new();
    let p = st.repo.join("index.json");
    let text = std::fs::read_to_string(&p).unwrap();
    std::fs::write(&p, text.replace("\"1.0\"", "\"9.0\"")).unwrap();
    st.refused(&["template", "install", "deb"], "signature does not verify");
}

#[test]
fn missing_signature_is_refused() {
    let st = Setup::new();
    std::fs::remove_file(st.repo.join("index.json.sig")).unwrap();
    st.refused(&["template", "install", "deb"], "no signature");
}

#[test]
fn unknown_key_is_refused() {
    let st = Setup::new();
    let other = st.publisher.root.join("other.key");
    st.publisher.ok(&["template", "repo", "keygen", s(&other)]);
    st.publisher.ok(&[
        "template",
        "repo",
        "resign",
        s(&st.repo),
        "--key",
        s(&other),
    ]);
    st.refused(&["template", "install", "deb"], "not trusted");
}

#[test]
fn key_rotation_signed_by_the_old_key_is_followed() {
    let st = Setup::new();
    let new = st.publisher.root.join("new.key");
    st.publisher.ok(&["template", "repo", "keygen", s(&new)]);
    st.publisher.ok(&[
        "template",
        "repo",
        "rotate",
        s(&st.repo),
        "--old-key",
        s(&st.key),
        "--new-key",
        s(&new),
    ]);
    let v = st.client.json(&["template", "install", "deb"]);
    assert_eq!(v["fingerprint"], fp(&st.v1).as_str(), "{v}");
    let show = st.client.json(&["template", "repo", "show"]);
    let newpub = std::fs::read_to_string(format!("{}.pub", s(&new))).unwrap();
    let newkey = newpub.lines().nth(1).unwrap();
    assert!(show["trust"]["keys"].to_string().contains(newkey), "{show}");
}

#[test]
fn rollback_to_an_older_index_is_refused() {
    let st = Setup::new();
    let old = std::fs::read(st.repo.join("index.json")).unwrap();
    let old_sig = std::fs::read(st.repo.join("index.json.sig")).unwrap();
    st.client.json(&["template", "install", "deb"]);
    st.publish("2.0", &image(2));
    st.client.json(&["template", "list", "--available"]);
    std::fs::write(st.repo.join("index.json"), old).unwrap();
    std::fs::write(st.repo.join("index.json.sig"), old_sig).unwrap();
    st.refused(&["template", "upgrade", "deb"], "rollback");
}

/// Qubes' client checks versions only on upgrade and downgrade; a fresh install of a
/// template here is held to the highest index version seen too.
#[test]
fn fresh_install_refuses_an_older_index() {
    let st = Setup::new();
    let old = std::fs::read(st.repo.join("index.json")).unwrap();
    let old_sig = std::fs::read(st.repo.join("index.json.sig")).unwrap();
    st.publish("2.0", &image(2));
    st.client.json(&["template", "list", "--available"]);
    std::fs::write(st.repo.join("index.json"), old).unwrap();
    std::fs::write(st.repo.join("index.json.sig"), old_sig).unwrap();
    st.refused(&["template", "install", "deb"], "rollback");
    assert!(st
        .client
        .fails(&["template", "info", "deb"])
        .contains("deb"));
}

#[test]
fn expired_index_is_refused() {
    let st = Setup::new();
    st.publisher.ok(&[
        "template",
        "repo",
        "resign",
        s(&st.repo),
        "--key",
        s(&st.key),
        "--expires-days",
        "0",
    ]);
    st.refused(&["template", "install", "deb"], "expired");
}

#[test]
fn oversize_package_is_refused() {
    let st = Setup::new();
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(st.package_file())
        .unwrap();
    f.write_all(&vec![0x55; 1 << 20]).unwrap();
    st.refused(&["template", "install", "deb"], "differs from the index");
}

#[test]
fn altered_package_is_refused() {
    let st = Setup::new();
    let p = st.package_file();
    let mut b = std::fs::read(&p).unwrap();
    let at = b.len() / 3;
    b[at] ^= 1;
    std::fs::write(&p, b).unwrap();
    st.refused(&["template", "install", "deb"], "does not match");
}

#[test]
fn mixed_package_is_refused() {
    let st = Setup::new();
    // Another build of the same size: only the hashes tell them apart.
    let other = st.publisher.root.join("other.img");
    let mut img = st.v1.clone();
    img[0] ^= 1;
    std::fs::write(&other, &img).unwrap();
    st.publisher
        .ok(&["template", "create", "deb2", "--from-image", s(&other)]);
    let pkg = st.publisher.root.join("deb2.qtpl");
    st.publisher.ok(&["template", "export", "deb2", s(&pkg)]);
    let mut bytes = std::fs::read(&pkg).unwrap();
    bytes.resize(
        std::fs::metadata(st.package_file()).unwrap().len() as usize,
        0,
    );
    std::fs::write(st.package_file(), bytes).unwrap();
    st.refused(&["template", "install", "deb"], "manifest does not match");
}

#[test]
fn name_mismatch_is_refused() {
    let st = Setup::new();
    st.resign_with(|idx| idx["packages"][0]["name"] = "fedora".into());
    st.refused(&["template", "install", "fedora"], "name");
    assert!(st
        .client
        .fails(&["template", "info", "fedora"])
        .contains("fedora"));
}

#[test]
fn version_mismatch_is_refused() {
    let st = Setup::new();
    st.resign_with(|idx| idx["packages"][0]["release_date"] = "2030-01-01".into());
    st.refused(&["template", "install", "deb"], "release date (version)");
}

#[test]
fn export_import_of_one_file_still_works_offline() {
    let st = Setup::new();
    let v = st
        .client
        .json(&["template", "import", s(&st.package_file()), "--name", "off"]);
    assert_eq!(v["fingerprint"], fp(&st.v1).as_str(), "{v}");
}
