//! `--blkhash` and `--blkhash-file` against real servers: nbdcopy 1.24's
//! own test vectors, and random sparse images checked against a naive
//! blkhash computed here, from every kind of source, with one worker and
//! several, in order and out of order.

mod common;

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use common::*;

/// A digest of `data` by the algorithm called `alg`.
fn digest(alg: &str, data: &[u8]) -> Vec<u8> {
    use sha2::Digest;
    match alg {
        "md5" => md5::Md5::digest(data).to_vec(),
        "sha1" => sha1::Sha1::digest(data).to_vec(),
        "sha256" => sha2::Sha256::digest(data).to_vec(),
        "sha512" => sha2::Sha512::digest(data).to_vec(),
        other => panic!("no algorithm {other}"),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The blkhash of the file at `path`, the naive way: read every block
/// (the last one short), hash it, hash the digests and the size.
fn naive_blkhash(alg: &str, block: u64, path: &Path) -> String {
    let mut file = File::open(path).unwrap();
    let size = file.metadata().unwrap().len();
    let mut digests = Vec::new();
    let mut buf = vec![0u8; block as usize];
    let mut left = size;
    while left > 0 {
        let n = left.min(block) as usize;
        file.read_exact(&mut buf[..n]).unwrap();
        digests.extend(digest(alg, &buf[..n]));
        left -= n as u64;
    }
    digests.extend(size.to_le_bytes());
    hex(&digest(alg, &digests))
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Run nbdcp with `flag` (`--blkhash...`), `--blkhash-file=FILE` and
/// `args`, standard input from `stdin`; return what FILE holds, checking
/// that it is one line.
fn blkhash_from(flag: &str, args: &[&str], stdin: Stdio) -> String {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("hash");
    let out = nbdcp()
        .arg(flag)
        .arg(format!("--blkhash-file={}", file.display()))
        .args(args)
        .stdin(stdin)
        .output()
        .unwrap();
    assert!(out.status.success(), "{flag} {args:?}: {}", stderr(&out));
    let text = std::fs::read_to_string(&file).unwrap();
    let line = text
        .strip_suffix('\n')
        .unwrap_or_else(|| panic!("{flag} {args:?}: no newline in {text:?}"));
    assert!(!line.contains('\n'), "{text:?}");
    line.to_string()
}

fn blkhash(flag: &str, args: &[&str]) -> String {
    blkhash_from(flag, args, Stdio::null())
}

/// A small deterministic generator (xorshift64*).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// A sparse image of `size` bytes: holes, `pieces` runs of random data at
/// random (unaligned) places, some with whole zero blocks written inside
/// them, some written zeroes; data or zeroes in its last bytes.
fn sparse_image(path: &Path, size: u64, pieces: usize, seed: u64) {
    let file = File::create(path).unwrap();
    file.set_len(size).unwrap();
    let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    for i in 0..pieces {
        let len = (1 + rng.below(400_000)).min(size);
        let offset = if i == 0 {
            size - len
        } else {
            rng.below(size - len + 1)
        };
        let mut buf = vec![0u8; len as usize];
        match rng.below(3) {
            0 => rng.fill(&mut buf),
            1 => {
                rng.fill(&mut buf);
                // Whole zero blocks inside data, at 4K, 64K alignment.
                let at = (rng.below(len) as usize).next_multiple_of(4096);
                let end = (at + 65536 * 2).min(buf.len());
                buf[at.min(end)..end].fill(0);
            }
            _ => {}
        }
        file.write_all_at(&buf, offset).unwrap();
    }
    file.sync_all().unwrap();
}

/// `(flag, algorithm, block size)` as nbdcopy spells them.
fn spec(flag: &str) -> (&str, u64) {
    let value = flag.strip_prefix("--blkhash").unwrap();
    let value = value.strip_prefix('=').unwrap_or(value);
    let (alg, size) = value.split_once('/').unwrap_or((value, "64K"));
    let alg = if alg.is_empty() { "sha256" } else { alg };
    let size = size.to_ascii_uppercase();
    let (digits, shift) = match size.strip_suffix('K') {
        Some(d) => (d, 10),
        None => match size.strip_suffix('M') {
            Some(d) => (d, 20),
            None => (size.as_str(), 0),
        },
    };
    (alg, digits.parse::<u64>().unwrap() << shift)
}

#[test]
fn nbdcopy_known_vectors() {
    // copy-blkhash-known.sh: nbdkit data plugin images and their hashes,
    // cross-checked by libnbd against blkhash's own implementation.
    let cases = [
        (
            "",
            "sha256",
            "af5570f5a1810b7af78caf4bc70a660f0df51e42baf91d4de5b2328de0e83dfc",
        ),
        ("\"hello\"", "md5", "f741ac9ce55f5325906bb14e9c05d467"),
        (
            "\"hello\"",
            "sha256",
            "337355feb53a5309d5aba92796223c2c84ffab930e706c01fef573a2722545e6",
        ),
        (
            "\"hello\"",
            "sha512",
            "eca04a593cf12ec4132993da709048e25a2f1be3526e132fb521ec9d41f023ec\
             4018b3fd07b014a33e36bb5fa145b36991f431e62f9e1a93bebea6c9565682c1",
        ),
        ("\"hello\"", "md5/4", "8262896de34125dec173722c920e8bd0"),
        (
            "\"hello\" @1048576 \"goodbye\"",
            "sha256",
            "61b8f3a8cea76e16eeff7ce27f1b7711c1f1e437f5038cec17773772a4bded28",
        ),
        (
            "\"12345678\"*512*256",
            "md5",
            "84fc21ac2f49ac283ff399378d834d1a",
        ),
        (
            "\"12345678\"*512*256",
            "sha256",
            "cbb388edd25e567b85f504c7b345497f9fb4f6bbf4e39768809184b9f9e678f8",
        ),
        (
            "\"12345678\"*512*256",
            "sha512/512k",
            "379f7eb1628058c7abbc4c96941ac972074815ea9ef4aca95eefb2b4f9c29f64\
             023fff8d966e9fddf08d07bdba548e75298917f10268fdf9ba636c2321a2214e",
        ),
    ];
    for (data, alg, want) in cases {
        let server = Server::nbdkit(&["data", data]);
        let flag = format!("--blkhash={alg}");
        let got = blkhash(&flag, &[&server.uri(), "null:"]);
        assert_eq!(got, want, "data {data:?} {alg}");
        // Synchronous, and read whole (no extents): the same.
        let got = blkhash(
            &flag,
            &["--synchronous", "--no-extents", &server.uri(), "null:"],
        );
        assert_eq!(got, want, "data {data:?} {alg} synchronous");
    }
}

#[test]
fn nbdcopy_pattern_vectors() {
    // copy-blkhash-pattern.sh: nbdkit pattern 1G.
    let server = Server::nbdkit(&["pattern", "1G"]);
    let uri = server.uri();
    assert_eq!(
        blkhash("--blkhash", &[&uri, "null:"]),
        "6750a1c3d78e46eaffb0d094624825dea88f0c7098b2424fce776c0748442649"
    );
    assert_eq!(
        blkhash("--blkhash=sha512/512k", &["-C", "2", &uri, "null:"]),
        "aef2905a223b2b9b565374ce9671bcb434fc944b0a108c8b5b98769d830b6c61\
         b9567de177791a092514675c3a3e0740758c6a5a171ae71d844c60315f07e334"
    );
}

#[test]
fn random_sparse_images_match_a_naive_blkhash() {
    let dir = tempfile::tempdir().unwrap();
    let flags = [
        "--blkhash=md5/4",
        "--blkhash=md5/512",
        "--blkhash=sha1/4K",
        "--blkhash",
        "--blkhash=sha512/1M",
        // Larger than a batch and than the image: one short block.
        "--blkhash=sha256/16M",
    ];
    // Unaligned ends: a short last block of data, of zeroes.
    for (seed, size) in [(1u64, (3 << 20) + 1234), (2, (5 << 20) - 1), (3, 1 << 20)] {
        let img = dir.path().join(format!("img{seed}"));
        if seed == 2 {
            mixed_image(&img, size, seed);
        } else {
            sparse_image(&img, size, 12, seed);
        }
        let path = img.to_str().unwrap();
        for flag in flags {
            let (alg, block) = spec(flag);
            let want = naive_blkhash(alg, block, &img);
            assert_eq!(blkhash(flag, &[path, "null:"]), want, "{flag} {path}");
            // A file destination (zeroes kept as holes), a small request
            // size so that blocks straddle batches, one worker.
            let out = dir.path().join("out");
            let got = blkhash(
                flag,
                &[
                    "--request-size=4K",
                    "--synchronous",
                    path,
                    out.to_str().unwrap(),
                ],
            );
            assert_eq!(got, want, "{flag} {path} synchronous");
            assert_same_bytes(&img, &out);
        }
    }
}

#[test]
fn every_kind_of_source_gives_the_same_blkhash() {
    require("qemu-img");
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.raw");
    // qemu rounds sizes up to whole 512-byte sectors: unaligned to the
    // blocks, but not to sectors (odd sizes are tested above).
    mixed_image(&img, (9 << 20) + 1536, 7);
    let raw = img.to_str().unwrap();
    let qcow2 = dir.path().join("disk.qcow2");
    let q = qcow2.to_str().unwrap();
    let status = Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "qcow2", raw, q])
        .status()
        .unwrap();
    assert!(status.success());
    let flag = "--blkhash=sha1/64K";
    let want = naive_blkhash("sha1", 65536, &img);

    let nbdkit = Server::nbdkit(&["file", raw]);
    let qemu = Server::qemu_nbd(&["-f", "qcow2", "-r", q]);
    let (nbdkit_uri, qemu_uri) = (nbdkit.uri(), qemu.uri());
    let out = dir.path().join("out.img");
    let o = out.to_str().unwrap();
    let runs: Vec<Vec<&str>> = vec![
        vec![raw, "null:"],
        vec![raw, o],
        vec!["-C", "4", "-T", "4", &nbdkit_uri, "null:"],
        vec!["--synchronous", &nbdkit_uri, o],
        vec![&qemu_uri, "null:"],
        vec!["--", "[", "qemu-nbd", "-f", "qcow2", "-r", q, "]", "null:"],
        vec!["--", "[", "nbdkit", "file", raw, "]", o],
    ];
    for args in &runs {
        assert_eq!(blkhash(flag, args), want, "{args:?}");
    }
    // Standard input: the stream path, whatever the destination.
    for dest in ["null:", o] {
        let stdin = Stdio::from(File::open(&img).unwrap());
        assert_eq!(
            blkhash_from(flag, &["-", dest], stdin),
            want,
            "stdin to {dest}"
        );
    }
    assert_same_bytes(&img, &out);
}

#[test]
fn segments_finishing_out_of_order_and_blocks_larger_than_a_segment() {
    // 1 GiB and a bit: nine 128 MiB segments with data in each, copied by
    // four connections, so segments finish out of order.
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("big.raw");
    let size = (1u64 << 30) + 4096 + 512;
    sparse_image(&img, size, 60, 11);
    let raw = img.to_str().unwrap();
    let server = Server::qemu_nbd(&["-f", "raw", "-r", "-e", "4", raw]);
    let uri = server.uri();
    for flag in [
        "--blkhash",
        "--blkhash=md5/512",
        // Blocks of 256 MiB: segments grow to one block each.
        "--blkhash=sha512/256M",
    ] {
        let (alg, block) = spec(flag);
        let want = naive_blkhash(alg, block, &img);
        let got = blkhash(flag, &["-C", "4", "-T", "4", &uri, "null:"]);
        assert_eq!(got, want, "{flag}");
    }
    // A local file source with several workers, to a file.
    let out = dir.path().join("out.raw");
    let got = blkhash("--blkhash=sha1", &["-T", "3", raw, out.to_str().unwrap()]);
    assert_eq!(got, naive_blkhash("sha1", 65536, &img));
    assert_same_bytes(&img, &out);
}

#[test]
fn the_hash_goes_to_stdout_unless_the_copy_does() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.raw");
    mixed_image(&img, (2 << 20) + 5, 3);
    let raw = img.to_str().unwrap();
    let want = naive_blkhash("sha256", 65536, &img);
    let out = nbdcp().args(["--blkhash", raw, "null:"]).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(String::from_utf8(out.stdout).unwrap(), format!("{want}\n"));

    // The copy on stdout: the hash needs a file, or it is a usage error.
    let out = nbdcp().args(["--blkhash", raw, "-"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("--blkhash-file"), "{}", stderr(&out));
    assert!(out.stdout.is_empty());
    let hash = dir.path().join("hash");
    let out = nbdcp()
        .arg("--blkhash")
        .arg(format!("--blkhash-file={}", hash.display()))
        .args([raw, "-"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        out.stdout == std::fs::read(&img).unwrap(),
        "stdout is the image alone"
    );
    assert_eq!(std::fs::read_to_string(&hash).unwrap(), format!("{want}\n"));

    // Without --blkhash, --blkhash-file is ignored, as by nbdcopy.
    let unused = dir.path().join("unused");
    let out = nbdcp()
        .arg(format!("--blkhash-file={}", unused.display()))
        .args([raw, "null:"])
        .output()
        .unwrap();
    assert!(out.status.success() && out.stdout.is_empty());
    assert!(!unused.exists());

    // A file that cannot be written fails the run after the copy.
    let out = nbdcp()
        .args([
            "--blkhash",
            "--blkhash-file=/nonexistent/dir/hash",
            raw,
            "null:",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("blkhash"), "{}", stderr(&out));
}

#[test]
fn bad_blkhash_forms_are_usage_errors() {
    for bad in [
        "--blkhash=sha3",
        "--blkhash=/1M",
        "--blkhash=md5/",
        "--blkhash=md5/3",
        "--blkhash=md5/0",
        "--blkhash=sha256/4G",
        "--blkhash=sha256/1Q",
    ] {
        let out = nbdcp().args([bad, "a", "null:"]).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{bad}: {}", stderr(&out));
        assert!(
            stderr(&out).contains("--blkhash"),
            "{bad}: {}",
            stderr(&out)
        );
    }
}

/// Run `cmd` and return its exit status and its own peak RSS in KiB.
/// `wait4` reaps the child (std's `wait` cannot give its rusage).
#[allow(clippy::zombie_processes)]
fn peak_rss(cmd: &mut Command) -> (i32, i64) {
    let child = cmd.stdout(Stdio::null()).spawn().unwrap();
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: wait4 fills plain structs for a child of ours.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    assert_eq!(r, pid);
    (libc::WEXITSTATUS(status), usage.ru_maxrss)
}

#[test]
fn memory_stays_flat_on_a_huge_sparse_image() {
    // 1 TiB of holes: 16M blocks of 64K. One record per block, as
    // nbdcopy keeps, would be hundreds of MiB; runs of zero blocks are
    // counters.
    let server = Server::nbdkit(&["memory", "1T"]);
    let dir = tempfile::tempdir().unwrap();
    let hash = dir.path().join("hash");
    let (code, rss_kib) = peak_rss(
        nbdcp()
            .arg("--blkhash")
            .arg(format!("--blkhash-file={}", hash.display()))
            .args([&server.uri(), "null:"]),
    );
    assert_eq!(code, 0);
    assert!(rss_kib < 64 * 1024, "peak RSS {rss_kib} KiB");
    let zero = digest("sha256", &vec![0u8; 65536]);
    let mut outer = Vec::with_capacity(32 << 20);
    for _ in 0..(1u64 << 24) {
        outer.extend_from_slice(&zero);
    }
    outer.extend((1u64 << 40).to_le_bytes());
    let want = hex(&digest("sha256", &outer));
    assert_eq!(std::fs::read_to_string(&hash).unwrap(), format!("{want}\n"));
}
