//! NBD over TLS against REAL servers: nbdkit (`--tls=require` with
//! `--tls-psk` and with `--tls-certificates`) and qemu-nbd
//! (`tls-creds-psk` and `tls-creds-x509` objects with `--tls-creds`), in
//! both directions and on both sides at once, every copy compared byte
//! for byte. Then what must fail, each as one line naming the endpoint,
//! exit status 1 and (checked with nbdkit's log filter) nothing written: a
//! wrong key, an unknown CA, a certificate for another host or expired, a
//! missing client certificate, and plain text against TLS either way.
//!
//! Certificates and keys are made by the harness with certtool and
//! psktool (`common::tls`).

mod common;

#[cfg(feature = "tls")]
mod with_tls {
    use std::path::Path;
    use std::time::{Duration, Instant};

    use super::common::tls::*;
    use super::common::*;

    const MIB: u64 = 1 << 20;

    /// Every connection in an nbdkit log ran TLS; returns how many there
    /// were.
    fn assert_all_tls(entries: &[LogEntry]) -> usize {
        let connects = requests_of(entries, LogCommand::Connect);
        assert!(!connects.is_empty(), "no connection was logged");
        for c in &connects {
            assert_eq!(
                c.arg("tls"),
                Some("1"),
                "connection {} without TLS",
                c.connection
            );
        }
        connects.len()
    }

    /// Nothing reached the log filter that could change the disk.
    fn assert_nothing_written(server: &Server) {
        let entries = server.log_entries();
        let writes = modifying_requests(&entries);
        assert!(writes.is_empty(), "requests got through: {writes:?}");
    }

    /// nbdkit serving `path` (read-only unless `writable`) with `tls`
    /// options, logged, on a Unix socket or TCP.
    fn nbdkit_file(tls: &[String], path: &Path, writable: bool, tcp: bool) -> Server {
        let file = format!("file={}", s(path));
        let mut args = with(tls, &[]);
        if !writable {
            args.push("-r");
        }
        args.extend(["file", &file]);
        if tcp {
            Server::nbdkit_tcp_logged(&args)
        } else {
            Server::nbdkit_logged(&args)
        }
    }

    // -----------------------------------------------------------------
    // Copies
    // -----------------------------------------------------------------

    /// nbdkit with pre-shared keys: NBD -> file over a Unix socket with
    /// several connections (a 160 MiB image is two segments), then
    /// file -> NBD over TCP, each connection inside TLS.
    #[test]
    fn nbdkit_psk_both_directions() {
        let pki = Pki::get();
        let d = tmp();
        let (src, _) = mixed(d.path(), "src.img", 160 * MIB, 21);
        let source = nbdkit_file(&nbdkit_psk_args(pki), &src, false, false);
        let out = d.path().join("out.img");
        run_ok(&["-C", "2", "-T", "2", &psk_uri(&source.uri(), pki), s(&out)]);
        assert_same_bytes(&src, &out);
        assert!(
            assert_all_tls(&source.wait_log_idle()) >= 2,
            "one connection only"
        );

        let dst = garbage(d.path(), "dst.img", 160 * MIB);
        let destination = nbdkit_file(&nbdkit_psk_args(pki), &dst, true, true);
        run_ok(&[
            "-C",
            "2",
            "-T",
            "2",
            s(&src),
            &psk_uri(&destination.uri(), pki),
        ]);
        assert_same_bytes(&src, &dst);
        assert!(
            assert_all_tls(&destination.wait_log_idle()) >= 2,
            "one connection only"
        );
    }

    /// nbdkit with X.509 certificates, checking the client's: TCP both
    /// ways (the certificate is for 127.0.0.1), and a Unix socket.
    #[test]
    fn nbdkit_x509_both_directions() {
        let pki = Pki::get();
        let d = tmp();
        let (src, _) = mixed(d.path(), "src.img", 12 * MIB, 22);
        let tls = nbdkit_x509_args(&pki.server(), true);
        let source = nbdkit_file(&tls, &src, false, true);
        let out = d.path().join("out.img");
        run_ok(&[&x509_uri(&source.uri(), &pki.client()), s(&out)]);
        assert_same_bytes(&src, &out);
        assert_all_tls(&source.wait_log_idle());

        let dst = garbage(d.path(), "dst.img", 12 * MIB);
        let destination = nbdkit_file(&tls, &dst, true, false);
        run_ok(&[s(&src), &x509_uri(&destination.uri(), &pki.client())]);
        assert_same_bytes(&src, &dst);
        assert_all_tls(&destination.wait_log_idle());
    }

    /// qemu-nbd with `tls-creds-x509` (verify-peer=on) over TCP, and with
    /// `tls-creds-psk` over a Unix socket, both directions each.
    #[test]
    fn qemu_nbd_x509_and_psk_both_directions() {
        let pki = Pki::get();
        let d = tmp();
        let (src, _) = mixed(d.path(), "src.img", 12 * MIB, 23);
        let x509 = qemu_x509_args(&pki.server());
        let psk = qemu_psk_args(pki);
        for (tls, tcp) in [(&x509, true), (&psk, false)] {
            let uri = |plain: &str| {
                if tcp {
                    x509_uri(plain, &pki.client())
                } else {
                    psk_uri(plain, pki)
                }
            };
            let out = d.path().join("out.img");
            let args = with(tls, &["-r", "-f", "raw", s(&src)]);
            let source = if tcp {
                Server::qemu_nbd_tcp(&args)
            } else {
                Server::qemu_nbd(&args)
            };
            run_ok(&[&uri(&source.uri()), s(&out)]);
            assert_same_bytes(&src, &out);

            let dst = garbage(d.path(), "dst.img", 12 * MIB);
            let args = with(tls, &["-f", "raw", s(&dst)]);
            let destination = if tcp {
                Server::qemu_nbd_tcp(&args)
            } else {
                Server::qemu_nbd(&args)
            };
            run_ok(&[s(&src), &uri(&destination.uri())]);
            drop(destination);
            assert_same_bytes(&src, &dst);
        }
    }

    /// What is negotiated, shown by -v: TLS 1.3 with AES-128-GCM against
    /// nbdkit; against qemu-nbd held to TLS 1.2 (its `priority=`), the
    /// DHE-PSK and ECDHE-RSA suites with AES-128-GCM.
    #[test]
    fn negotiated_versions_and_suites() {
        let pki = Pki::get();
        let server = Server::nbdkit(&with(&nbdkit_psk_args(pki), &["pattern", "1M"]));
        let done = run(&["-v", &psk_uri(&server.uri(), pki), "null:"]);
        done.assert_ok();
        assert!(
            done.stderr.contains("TLS: TLSv1.3 TLS_AES_128_GCM_SHA256"),
            "{}",
            done.stderr
        );

        let tls12 = "priority=NORMAL:-VERS-TLS1.3";
        let psk = format!(
            "tls-creds-psk,id=tls0,dir={},endpoint=server,{tls12}:+ECDHE-PSK:+DHE-PSK:+PSK",
            pki.psk_dir().display()
        );
        let x509 = format!(
            "tls-creds-x509,id=tls0,dir={},endpoint=server,verify-peer=on,{tls12}",
            pki.server().display()
        );
        let cases = [
            (psk, false, "TLS: TLSv1.2 DHE-PSK-AES128-GCM-SHA256"),
            (x509, true, "TLS: TLSv1.2 ECDHE-RSA-AES128-GCM-SHA256"),
        ];
        let d = tmp();
        let img = garbage(d.path(), "src.img", MIB);
        for (object, tcp, want) in cases {
            let args = [
                "--object",
                &object,
                "--tls-creds",
                "tls0",
                "-r",
                "-f",
                "raw",
                s(&img),
            ];
            let (server, uri) = if tcp {
                let server = Server::qemu_nbd_tcp(&args);
                let uri = x509_uri(&server.uri(), &pki.client());
                (server, uri)
            } else {
                let server = Server::qemu_nbd(&args);
                let uri = psk_uri(&server.uri(), pki);
                (server, uri)
            };
            let out = d.path().join("out.img");
            let done = run(&["-v", &uri, s(&out)]);
            done.assert_ok();
            assert!(done.stderr.contains(want), "{want}: {}", done.stderr);
            drop(server);
            assert_same_bytes(&img, &out);
        }
    }

    /// TLS on both sides at once: nbdkit with a pre-shared key as the
    /// source, qemu-nbd with certificates (serving 4 clients) as the
    /// destination.
    #[test]
    fn tls_on_both_sides() {
        let pki = Pki::get();
        let d = tmp();
        let (src, _) = mixed(d.path(), "src.img", 160 * MIB, 24);
        let source = nbdkit_file(&nbdkit_psk_args(pki), &src, false, false);
        let dst = garbage(d.path(), "dst.img", 160 * MIB);
        let tls = qemu_x509_args(&pki.server());
        let args = with(&tls, &["-e", "4", "-f", "raw", s(&dst)]);
        let destination = Server::qemu_nbd_tcp(&args);
        run_ok(&[
            "-C",
            "4",
            &psk_uri(&source.uri(), pki),
            &x509_uri(&destination.uri(), &pki.client()),
        ]);
        drop(destination);
        assert_same_bytes(&src, &dst);
        assert_all_tls(&source.wait_log_idle());
    }

    /// The source is killed mid-copy and started again: nbdcp reconnects,
    /// through TLS again, and the copy is exact.
    #[test]
    fn reconnections_use_tls_too() {
        let pki = Pki::get();
        let d = tmp();
        let (src, _) = mixed(d.path(), "src.img", 160 * MIB, 25);
        let out = d.path().join("out.img");
        let file = format!("file={}", s(&src));
        let tls = nbdkit_psk_args(pki);
        let args = with(
            &tls,
            &["-r", "--filter=delay", "file", &file, "rdelay=200ms"],
        );
        let mut source = Daemon::nbdkit_logged(d.path(), Listen::tcp(), &args);
        let uri = psk_uri(&source.uri(), pki);
        let run = Watched::spawn(&["-C", "2", "-T", "2", &uri, s(&out)]);
        source.wait_for_requests(LogCommand::Read, 2, Duration::from_secs(10));
        source.kill();
        wait_until("nbdcp to retry", Duration::from_secs(10), || {
            run.stderr_so_far().contains("retry 1 of 5")
        });
        source.restart();
        run.wait(HANG_DEADLINE).assert_ok_after_warnings();
        assert_same_bytes(&src, &out);
        let entries = parse_nbdkit_log(&source.log_text());
        assert!(assert_all_tls(&entries) > 2, "no reconnection was logged");
    }

    /// tls-hostname names the host a certificate is for; tls-verify-peer
    /// turns checking off.
    #[test]
    fn tls_hostname_and_verify_peer() {
        let pki = Pki::get();
        let server = Server::nbdkit_tcp(&with(
            &nbdkit_x509_args(&pki.other_host(), false),
            &["pattern", "1M"],
        ));
        let d = tmp();
        let out = d.path().join("out.img");
        let client = pki.client();
        let cert = client.to_str().unwrap();
        let named = tls_uri(
            &server.uri(),
            &[("tls-certificates", cert), ("tls-hostname", OTHER_HOST)],
        );
        run_ok(&[&named, s(&out)]);
        assert_file_is(&out, &pattern_bytes(MIB));
        let wrong_ca = pki.client_wrong_ca();
        let unchecked = tls_uri(
            &server.uri(),
            &[
                ("tls-certificates", wrong_ca.to_str().unwrap()),
                ("tls-verify-peer", "false"),
            ],
        );
        run_ok(&[&unchecked, "null:"]);
    }

    /// Without tls-certificates, `$HOME/.pki/libnbd` is used; without it
    /// either, the system's roots, which did not sign the test CA.
    #[test]
    fn default_certificate_directory() {
        let pki = Pki::get();
        let server = Server::nbdkit_tcp(&with(
            &nbdkit_x509_args(&pki.server(), true),
            &["pattern", "1M"],
        ));
        let home = tmp();
        let uri = tls_uri(&server.uri(), &[]);
        let failed = Nbdcp::new(&[&uri, "null:"])
            .env("HOME", s(home.path()))
            .run();
        let line = failed.assert_clean_failure(&uri);
        assert!(line.contains("system's trusted roots"), "{line}");
        let dir = home.path().join(".pki/libnbd");
        std::fs::create_dir_all(&dir).unwrap();
        for f in ["ca-cert.pem", "client-cert.pem", "client-key.pem"] {
            std::fs::copy(pki.client().join(f), dir.join(f)).unwrap();
        }
        Nbdcp::new(&[&uri, "null:"])
            .env("HOME", s(home.path()))
            .run()
            .assert_ok();
    }

    /// The PSK user: the URI's user part, tls-username, or the login name.
    #[test]
    fn psk_user_names() {
        let pki = Pki::get();
        let server = Server::nbdkit(&with(&nbdkit_psk_args(pki), &["pattern", "1M"]));
        let file = pki.psk();
        let keys = file.to_str().unwrap();
        let plain = server
            .uri()
            .replace("nbd+unix://", &format!("nbds+unix://{PSK_USER}@"));
        run_ok(&[&format!("{plain}&tls-psk-file={keys}"), "null:"]);
        let anonymous = tls_uri(&server.uri(), &[("tls-psk-file", keys)]);
        Nbdcp::new(&[&anonymous, "null:"])
            .env("LOGNAME", PSK_USER)
            .run()
            .assert_ok();
        let bob = Nbdcp::new(&[&anonymous, "null:"])
            .env("LOGNAME", "bob")
            .run();
        let line = bob.assert_clean_failure(&anonymous);
        assert!(line.contains("no key for user 'bob'"), "{line}");
    }

    /// A connection blocked on a read inside TLS is broken off by its
    /// interrupter at once (the socket underneath is shut down).
    #[test]
    fn interrupter_ends_a_blocked_tls_read() {
        let pki = Pki::get();
        let server = Server::nbdkit(&with(
            &nbdkit_psk_args(pki),
            &["--filter=delay", "pattern", "1M", "rdelay=60"],
        ));
        let uri = nbd::NbdUri::parse(&psk_uri(&server.uri(), pki)).unwrap();
        let mut client = nbd::Client::connect(&uri, &nbd::ClientOptions::default()).unwrap();
        assert!(client.is_tls());
        let interrupter = client.interrupter().unwrap();
        let reader = std::thread::spawn(move || {
            let mut buf = vec![0u8; 4096];
            let started = Instant::now();
            let r = client.read_many(&mut [(0u64, &mut buf[..])], 1, 1 << 20);
            (r.is_err(), started.elapsed())
        });
        std::thread::sleep(Duration::from_millis(300));
        interrupter.interrupt();
        let (failed, took) = reader.join().unwrap();
        assert!(failed, "the read succeeded");
        assert!(took < Duration::from_secs(5), "the read took {took:?}");
    }

    // -----------------------------------------------------------------
    // Failures: one line naming the endpoint and the cause, nothing
    // written
    // -----------------------------------------------------------------

    /// Copy a small file to `dst_uri`; it must fail cleanly with `want`
    /// in the message, and nothing may reach `server`.
    fn refused_write(server: &Server, dst_uri: &str, want: &[&str]) {
        let d = tmp();
        let src = garbage(d.path(), "src.img", MIB);
        let done = run(&[s(&src), dst_uri]);
        let line = done.assert_clean_failure(dst_uri);
        for w in want {
            assert!(line.contains(w), "expected {w:?} in: {line}");
        }
        assert_nothing_written(server);
    }

    fn memory_server(tls: &[String], tcp: bool) -> Server {
        let args = with(tls, &["memory", "1M"]);
        if tcp {
            Server::nbdkit_tcp_logged(&args)
        } else {
            Server::nbdkit_logged(&args)
        }
    }

    #[test]
    fn wrong_psk() {
        let pki = Pki::get();
        let server = memory_server(&nbdkit_psk_args(pki), false);
        let file = pki.wrong_psk();
        let uri = tls_uri(
            &server.uri(),
            &[
                ("tls-psk-file", file.to_str().unwrap()),
                ("tls-username", PSK_USER),
            ],
        );
        refused_write(
            &server,
            &uri,
            &["did not accept the pre-shared key of user 'alice'"],
        );
    }

    #[test]
    fn unknown_ca() {
        let pki = Pki::get();
        let server = memory_server(&nbdkit_x509_args(&pki.server(), false), true);
        let uri = x509_uri(&server.uri(), &pki.client_wrong_ca());
        refused_write(
            &server,
            &uri,
            &["certificate was not accepted", "not signed by the CA in"],
        );
    }

    #[test]
    fn certificate_for_another_host() {
        let pki = Pki::get();
        let server = memory_server(&nbdkit_x509_args(&pki.other_host(), false), true);
        let uri = x509_uri(&server.uri(), &pki.client());
        refused_write(&server, &uri, &["IP address mismatch", "tls-hostname="]);
        let by_name = uri.replace("127.0.0.1", "localhost");
        refused_write(&server, &by_name, &["hostname mismatch", "'localhost'"]);
    }

    #[test]
    fn expired_certificate() {
        let pki = Pki::get();
        let server = memory_server(&nbdkit_x509_args(&pki.expired(), false), true);
        let uri = x509_uri(&server.uri(), &pki.client());
        refused_write(&server, &uri, &["certificate has expired"]);
    }

    #[test]
    fn missing_client_certificate() {
        let pki = Pki::get();
        let server = memory_server(&nbdkit_x509_args(&pki.server(), true), true);
        let uri = x509_uri(&server.uri(), &pki.client_without_cert());
        refused_write(
            &server,
            &uri,
            &["did not accept our credentials", "client-cert.pem"],
        );
        // qemu-nbd's verify-peer=on, as a source.
        let tls = qemu_x509_args(&pki.server());
        let q = Server::qemu_nbd_tcp(&with(&tls, &["-r", "-f", "raw", "/dev/null"]));
        let uri = x509_uri(&q.uri(), &pki.client_without_cert());
        let line = run(&[&uri, "null:"]).assert_clean_failure(&uri).to_string();
        assert!(line.contains("did not accept our credentials"), "{line}");
    }

    #[test]
    fn plain_text_to_a_tls_server() {
        let pki = Pki::get();
        for tcp in [false, true] {
            let server = memory_server(&nbdkit_psk_args(pki), tcp);
            refused_write(&server, &server.uri(), &["server requires TLS", "nbds://"]);
        }
        let tls = qemu_psk_args(pki);
        let q = Server::qemu_nbd(&with(&tls, &["-r", "-f", "raw", "/dev/null"]));
        let line = run(&[&q.uri(), "null:"])
            .assert_clean_failure(&q.uri())
            .to_string();
        assert!(line.contains("server requires TLS"), "{line}");
    }

    #[test]
    fn tls_to_a_plain_server() {
        let pki = Pki::get();
        for tls in [vec!["--tls=off".to_string()], vec![]] {
            let server = memory_server(&tls, true);
            let uri = psk_uri(&server.uri(), pki);
            refused_write(
                &server,
                &uri,
                &["server does not offer TLS", "not continuing in plain text"],
            );
        }
        let q = Server::qemu_nbd(&["-f", "raw", "/dev/null"]);
        let uri = psk_uri(&q.uri(), pki);
        let line = run(&[&uri, "null:"]).assert_clean_failure(&uri).to_string();
        assert!(line.contains("server does not offer TLS"), "{line}");
    }

    #[test]
    fn unusable_credentials_are_named() {
        let pki = Pki::get();
        let server = memory_server(&nbdkit_psk_args(pki), false);
        let d = tmp();
        let missing = d.path().join("none.psk");
        let uri = tls_uri(&server.uri(), &[("tls-psk-file", s(&missing))]);
        refused_write(&server, &uri, &["tls-psk-file", "none.psk"]);
        let uri = tls_uri(
            &server.uri(),
            &[("tls-certificates", s(&d.path().join("nope")))],
        );
        refused_write(&server, &uri, &["tls-certificates", "nope"]);
    }
}

/// Built without TLS, a TLS URI says so.
#[cfg(not(feature = "tls"))]
#[test]
fn tls_was_not_built_in() {
    let d = common::tmp();
    let sock = d.path().join("none.sock");
    let uri = format!("nbds+unix:///?socket={}", sock.display());
    let line = common::run(&[&uri, "null:"])
        .assert_clean_failure(&uri)
        .to_string();
    assert!(line.contains("TLS was not built in"), "{line}");
}
