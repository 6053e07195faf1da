//! Writes nbdcp's manual page and shell completions from the clap
//! definition the binary itself uses, or checks that the checked-in copies
//! are what it would write.
//!
//! ```text
//! cargo run -p xtask -- generate   # write doc/nbdcp.1 and completions/nbdcp.{bash,zsh,fish}
//! cargo run -p xtask -- check      # regenerate into a temporary folder; fail with a diff if they differ
//! ```

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use clap_complete::Shell;
use clap_mangen::Man;
use clap_mangen::roff::{Roff, bold, roman};

/// The binary's own definition of its command line.
#[allow(dead_code)]
#[path = "../../src/bin/nbdcp/args.rs"]
mod args;

/// Longest line of the SYNOPSIS.
const SYNOPSIS_WIDTH: usize = 72;

/// The files this tool writes, relative to the workspace root.
const MAN_PAGE: &str = "doc/nbdcp.1";
const COMPLETIONS: &[(Shell, &str)] = &[
    (Shell::Bash, "completions/nbdcp.bash"),
    (Shell::Zsh, "completions/nbdcp.zsh"),
    (Shell::Fish, "completions/nbdcp.fish"),
];

fn main() -> ExitCode {
    let root = workspace_root();
    let result = match std::env::args().nth(1).as_deref() {
        Some("generate") => generate(&root),
        Some("check") => check(&root),
        _ => {
            eprintln!("usage: cargo run -p xtask -- generate|check");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("xtask: {e}");
            ExitCode::FAILURE
        }
    }
}

fn workspace_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// Every generated file: its path relative to the root, and its contents.
fn outputs() -> io::Result<Vec<(&'static str, Vec<u8>)>> {
    let mut files = vec![(MAN_PAGE, man_page()?)];
    for &(shell, path) in COMPLETIONS {
        let mut out = Vec::new();
        clap_complete::generate(shell, &mut args::command(), "nbdcp", &mut out);
        files.push((path, out));
    }
    Ok(files)
}

fn write_all(dir: &Path, files: &[(&str, Vec<u8>)]) -> io::Result<()> {
    for (path, contents) in files {
        let path = dir.join(path);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&path, contents)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
    }
    Ok(())
}

fn generate(root: &Path) -> io::Result<bool> {
    let files = outputs()?;
    write_all(root, &files)?;
    for (path, _) in &files {
        println!("wrote {path}");
    }
    Ok(true)
}

/// Regenerate into a temporary folder and compare with the checked-in
/// files; print a diff of each one that differs.
fn check(root: &Path) -> io::Result<bool> {
    let files = outputs()?;
    let tmp = std::env::temp_dir().join(format!("nbdcp-xtask-check-{}", std::process::id()));
    write_all(&tmp, &files)?;
    let mut same = true;
    for (path, contents) in &files {
        let checked_in = root.join(path);
        if std::fs::read(&checked_in).ok().as_ref() == Some(contents) {
            continue;
        }
        same = false;
        eprintln!("xtask: {path} is not what the clap definition gives:");
        // diff(1) shows how; its absence must not hide that they differ.
        let shown = Command::new("diff")
            .arg("-u")
            .arg(&checked_in)
            .arg(tmp.join(path))
            .status()
            .is_ok();
        if !shown {
            eprintln!("(diff(1) is not installed to show how)");
        }
    }
    let _ = std::fs::remove_dir_all(&tmp);
    if same {
        println!("doc/nbdcp.1 and completions/ match the clap definition");
    } else {
        eprintln!("xtask: run `cargo run -p xtask -- generate` and commit the result");
    }
    Ok(same)
}

/// The manual page: clap_mangen's title, name, synopsis, description and
/// options, then the sections that are not options, then the version.
fn man_page() -> io::Result<Vec<u8>> {
    // SOURCE and DESTINATION are described in the synopsis and ENDPOINTS,
    // not as an option.
    let cmd = args::command().mut_arg("endpoints", |a| a.hide(true));
    let man = Man::new(cmd.clone()).manual("User Commands");
    let mut out = Vec::new();
    man.render_title(&mut out)?;
    // Left-aligned and never hyphenated: option names must stay whole.
    let mut setup = Roff::new();
    setup.control("ad", ["l"]).control("nh", [] as [&str; 0]);
    setup.to_writer(&mut out)?;
    man.render_name_section(&mut out)?;
    synopsis(&cmd).to_writer(&mut out)?;
    man.render_description_section(&mut out)?;
    man.render_options_section(&mut out)?;

    let mut roff = Roff::new();
    list(&mut roff, "ENDPOINTS", args::ENDPOINTS);
    list(&mut roff, "EXIT STATUS", args::EXIT_STATUS);
    list(&mut roff, "ENVIRONMENT", args::ENVIRONMENT);
    roff.control("SH", ["EXAMPLES"]);
    for (command, what) in args::EXAMPLES {
        roff.control("TP", [] as [&str; 0])
            .text([bold(*command)])
            .text([roman(*what)]);
    }
    roff.control("SH", ["COMPATIBILITY"]).text([
        roman("nbdcp takes the options of "),
        bold("nbdcopy"),
        roman(
            "(1) 1.24 with the same meaning, and options of its own; the table in nbdcp's \
             README lists the few that differ, and why.",
        ),
    ]);
    roff.control("SH", ["SEE ALSO"]);
    let mut refs = Vec::new();
    for (i, page) in args::SEE_ALSO.split(", ").enumerate() {
        if i > 0 {
            refs.push(roman(", "));
        }
        match page.split_once('(') {
            Some((name, section)) => {
                refs.push(bold(name));
                refs.push(roman(format!("({section}")));
            }
            None => refs.push(roman(page)),
        }
    }
    roff.text(refs);
    roff.to_writer(&mut out)?;
    out.flush()?;
    Ok(out)
}

/// The SYNOPSIS in nbdcopy's style, `[-C N|--connections=N]`, from the
/// options clap knows.
fn synopsis(cmd: &clap::Command) -> Roff {
    let mut roff = Roff::new();
    roff.control("SH", ["SYNOPSIS"]);
    let mut words = vec!["nbdcp".to_string()];
    for arg in cmd.get_arguments() {
        let id = arg.get_id().as_str();
        if arg.is_positional() || id == "help" || id == "version" {
            continue;
        }
        let value = arg
            .get_value_names()
            .and_then(|v| v.first())
            .map(|v| v.to_string());
        let takes_value = arg.get_action().takes_values();
        let optional = arg.get_num_args().is_some_and(|n| n.min_values() == 0);
        let mut forms = Vec::new();
        if let Some(c) = arg.get_short() {
            forms.push(match (&value, takes_value && !optional) {
                (Some(v), true) => format!("-{c} {v}"),
                _ => format!("-{c}"),
            });
        }
        let longs = arg
            .get_long()
            .into_iter()
            .chain(arg.get_visible_aliases().unwrap_or_default());
        for long in longs {
            match (&value, takes_value) {
                (Some(v), true) if optional => {
                    forms.push(format!("--{long}"));
                    forms.push(format!("--{long}={v}"));
                }
                (Some(v), true) => forms.push(format!("--{long}={v}")),
                _ => forms.push(format!("--{long}")),
            }
        }
        words.push(format!("[{}]", forms.join("|")));
    }
    words.push("SOURCE DESTINATION".into());
    // Without filling, as nbdcopy's: an option is never broken or
    // hyphenated across lines.
    roff.control("nf", [] as [&str; 0]);
    let mut line = String::new();
    for word in words {
        if !line.is_empty() && line.len() + 1 + word.len() > SYNOPSIS_WIDTH {
            roff.text([roman(std::mem::take(&mut line))]);
            line.push_str("      ");
        } else if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(&word);
    }
    roff.text([roman(line)]);
    roff.text([roman("")]);
    roff.text([roman("nbdcp -h|--help")]);
    roff.text([roman("nbdcp -V|--version")]);
    roff.control("fi", [] as [&str; 0]);
    roff
}

/// A section of terms, each with its paragraph.
fn list(roff: &mut Roff, title: &str, items: &[(&str, &str)]) {
    roff.control("SH", [title]);
    for (term, text) in items {
        roff.control("TP", [] as [&str; 0])
            .text([bold(*term)])
            .text([roman(*text)]);
    }
}
