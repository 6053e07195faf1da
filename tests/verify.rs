//! `--verify`: the destination read back and compared by blkhash, against
//! destinations that keep what they are given and one that silently
//! corrupts a byte.

mod common;

use common::*;

const MIB: u64 = 1 << 20;

/// An nbdkit `eval` destination of `size` bytes kept in `file`, that flips
/// the byte at `corrupt` (if any) whenever the write covering it arrives.
fn eval_destination(file: &std::path::Path, size: u64, corrupt: Option<u64>) -> Vec<String> {
    let f = file.display();
    let flip = match corrupt {
        Some(at) => format!(
            "if [ $4 -le {at} ] && [ $(($4 + $3)) -gt {at} ]; then printf '\\377' | dd of={f} bs=1 seek={at} conv=notrunc status=none; fi"
        ),
        None => String::new(),
    };
    vec![
        "[".into(),
        "nbdkit".into(),
        "--exit-with-parent".into(),
        "--log=null".into(),
        "eval".into(),
        format!("get_size=echo {size}"),
        format!("pread=dd if={f} skip=$4 count=$3 iflag=skip_bytes,count_bytes status=none"),
        format!("pwrite=dd of={f} seek=$4 oflag=seek_bytes conv=notrunc status=none; {flip}"),
        "flush=true".into(),
        "thread_model=echo serialize_requests".into(),
        "]".into(),
    ]
}

fn run_with(flags: &[&str], source: &str, destination: &[String]) -> Finished {
    let mut args: Vec<&str> = flags.to_vec();
    args.push("--");
    args.push(source);
    args.extend(destination.iter().map(String::as_str));
    Nbdcp::new(&args).run()
}

#[test]
fn a_faithful_copy_is_verified_and_says_so() {
    let dir = tmp();
    let (src, _) = mixed(dir.path(), "src.img", 6 * MIB + 512, 41);
    let dst = dir.path().join("dst.img");
    let run = Nbdcp::new(&["--verify", "-C", "2", s(&src), s(&dst)]).run();
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert_same_bytes(&src, &dst);
    let lines: Vec<&str> = run.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{}", run.stderr);
    assert!(lines[0].starts_with("nbdcp: verified: "), "{}", lines[0]);
    assert!(lines[0].contains("sha256/64K blkhash "), "{}", lines[0]);
    // The hash printed is the one --blkhash gives.
    let hashed = Nbdcp::new(&["--blkhash", s(&src), "null:"]).run();
    let hash = String::from_utf8(hashed.stdout.clone()).unwrap();
    assert!(lines[0].ends_with(hash.trim()), "{} vs {hash}", lines[0]);
    assert!(run.stdout.is_empty(), "nothing on stdout without --blkhash");
}

#[test]
fn a_server_nbdcp_started_is_read_back_before_it_is_stopped() {
    require("nbdkit");
    let dir = tmp();
    let (src, _) = mixed(dir.path(), "src.img", 4 * MIB, 42);
    // nbdkit memory forgets everything when it stops: only the same
    // server can be read back.
    let dst = ["[", "nbdkit", "--exit-with-parent", "memory", "4M", "]"].map(String::from);
    let run = run_with(&["--verify", "--blkhash=md5/4K"], s(&src), &dst);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert!(run.stderr.contains("verified: "), "{}", run.stderr);
    assert!(run.stderr.contains("md5/4K"), "{}", run.stderr);
    assert_eq!(String::from_utf8_lossy(&run.stdout).trim().len(), 32);
}

#[test]
fn a_destination_that_corrupts_a_byte_is_caught() {
    require("nbdkit");
    let dir = tmp();
    let (src, _) = mixed(dir.path(), "src.img", 4 * MIB, 43);
    let backing = dir.path().join("backing.img");
    std::fs::File::create(&backing)
        .unwrap()
        .set_len(4 * MIB)
        .unwrap();
    // The byte at 1 MiB + 100 is flipped as it is written: the first
    // differing 64 KiB block is the one at 1 MiB.
    let dst = eval_destination(&backing, 4 * MIB, Some(MIB + 100));
    let run = run_with(&["--verify", "-S", "0", "--no-extents"], s(&src), &dst);
    let line = run.assert_failure(3, "nbdkit");
    assert!(
        line.contains(&format!("at offset {MIB} length 65536")),
        "{line}"
    );
    assert!(line.contains("differs from the source"), "{line}");
    // The same destination without the flip verifies.
    std::fs::File::create(&backing)
        .unwrap()
        .set_len(4 * MIB)
        .unwrap();
    let dst = eval_destination(&backing, 4 * MIB, None);
    let run = run_with(&["--verify", "-S", "0", "--no-extents"], s(&src), &dst);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
}

#[test]
fn verify_needs_a_destination_it_can_read_back() {
    let dir = tmp();
    let (src, _) = mixed(dir.path(), "src.img", MIB, 44);
    Nbdcp::new(&["--verify", s(&src), "null:"])
        .run()
        .assert_failure(2, "null:");
    Nbdcp::new(&["--verify", s(&src), "-"])
        .run()
        .assert_failure(2, "-");
}

/// The blkhash of a range is the blkhash of its bytes as an image, and
/// --verify checks a range where it was written, on a larger destination.
#[test]
fn ranges_are_hashed_and_verified_as_images_of_their_own() {
    let dir = tmp();
    let (src, _) = mixed(dir.path(), "src.img", 8 * MIB, 45);
    // The range's bytes alone, as a file.
    let bytes = std::fs::read(&src).unwrap();
    let part = dir.path().join("part.img");
    std::fs::write(&part, &bytes[(MIB as usize)..(5 * MIB) as usize]).unwrap();
    let whole = Nbdcp::new(&["--blkhash=sha1/64K", s(&part), "null:"]).run();
    assert_eq!(whole.code, Some(0), "{}", whole.stderr);
    let dst = garbage(dir.path(), "dst.img", 12 * MIB);
    let range = Nbdcp::new(&[
        "--blkhash=sha1/64K",
        "--verify",
        "--source-offset=1M",
        "--length=4M",
        "--destination-offset=2M",
        s(&src),
        s(&dst),
    ])
    .run();
    assert_eq!(range.code, Some(0), "{}", range.stderr);
    assert_eq!(range.stdout, whole.stdout, "the range's blkhash");
    assert!(range.stderr.contains("verified: "), "{}", range.stderr);
    let d = std::fs::read(&dst).unwrap();
    assert!(d[(2 * MIB) as usize..(6 * MIB) as usize] == bytes[MIB as usize..(5 * MIB) as usize]);
}
