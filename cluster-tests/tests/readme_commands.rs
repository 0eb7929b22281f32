//! Every `ramster` command line that README.md and docs/*.md show still
//! parses: a renamed flag, a dropped subcommand or a value the binary now
//! refuses fails here, naming the file and line, instead of in a reader's
//! shell.
//!
//! Commands come from fenced code blocks (every line, `\` continuations
//! joined) and from inline code spans that start with the binary. Each is
//! parsed in-process with the binary's own clap definition
//! (`ramster_node::cli::Cli`), so nothing runs. A command may leave out
//! what the prose supplies: a required flag or a subcommand missing is
//! fine; an unknown flag or subcommand, a refused value or a conflict is
//! not. Placeholders are filled in: `...` is dropped, `[optional]` parts
//! are checked as written, `a|b` checks each alternative, and `NAME`,
//! `<name>` or `$VAR` are tried with a few plausible values (a name, a
//! number, a size, an address, a path, a shell), the command passing if
//! one of them parses.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use clap::Parser;
use clap::error::ErrorKind;
use ramster_node::cli::Cli;

/// Lines in code blocks that name the binary without being a command of
/// it: (file, text the line contains, why).
const NOT_COMMANDS: &[(&str, &str, &str)] = &[(
    "docs/operating.md",
    "helm install swap charts/ramster",
    "charts/ramster is the chart's directory, not the binary",
)];

/// Code block languages whose lines are not shell commands.
const NOT_SHELL: &[&str] = &[
    "toml", "yaml", "yml", "json", "mermaid", "rust", "ini", "promql", "text",
];

/// Values a placeholder is tried with, in order.
const SAMPLES: &[&str] = &["n1", "1", "1GiB", "127.0.0.1:7801", "/tmp/x", "bash"];

/// A placeholder's option that leaves the word out.
const OMITTED: &str = "";

/// At most this many combinations of placeholder values per command.
const COMBINATIONS_MAX: usize = 1024;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Where a command was found, and whether it must be one (a code block's
/// line) or is only checked if it looks like one (an inline span).
#[derive(Debug)]
struct Snippet {
    file: String,
    line: usize,
    text: String,
    fenced: bool,
}

/// The logical lines of the fenced code blocks (continuations joined) and
/// the inline code spans of a markdown file.
fn snippets(file: &str, text: &str) -> Vec<Snippet> {
    let mut out = Vec::new();
    let mut prose = String::new();
    let mut fence: Option<(String, bool)> = None; // (marker, shell)
    let mut pending: Option<(usize, String)> = None;
    for (i, raw) in text.lines().enumerate() {
        let n = i + 1;
        let trimmed = raw.trim_start();
        let marker = ["```", "~~~"].into_iter().find(|m| trimmed.starts_with(m));
        match (&fence, marker) {
            (None, Some(m)) => {
                let lang = trimmed.trim_start_matches(m).trim().to_ascii_lowercase();
                let lang = lang.split_whitespace().next().unwrap_or("");
                fence = Some((m.to_string(), !NOT_SHELL.contains(&lang)));
                prose.push('\n');
                continue;
            }
            (Some((open, _)), Some(m)) if open == m && trimmed.trim_end() == m => {
                fence = None;
                if let Some((start, t)) = pending.take() {
                    out.push(Snippet {
                        file: file.into(),
                        line: start,
                        text: t,
                        fenced: true,
                    });
                }
                prose.push('\n');
                continue;
            }
            _ => {}
        }
        match &fence {
            Some((_, true)) => {
                let (start, mut t) = pending.take().unwrap_or((n, String::new()));
                let body = raw.trim();
                match body.strip_suffix('\\') {
                    Some(head) => {
                        t.push_str(head);
                        t.push(' ');
                        pending = Some((start, t));
                    }
                    None => {
                        t.push_str(body);
                        out.push(Snippet {
                            file: file.into(),
                            line: start,
                            text: t,
                            fenced: true,
                        });
                    }
                }
                prose.push('\n');
            }
            Some((_, false)) => prose.push('\n'),
            None => {
                prose.push_str(raw);
                prose.push('\n');
            }
        }
    }
    // Inline spans: single backticks, possibly across a line break.
    let mut line = 1;
    let mut rest = prose.as_str();
    while let Some(i) = rest.find('`') {
        line += rest[..i].matches('\n').count();
        let after = &rest[i + 1..];
        if after.starts_with('`') {
            // A double-backtick span or an empty one: not a command.
            let skip = after.trim_start_matches('`');
            rest = skip;
            continue;
        }
        let Some(j) = after.find('`') else { break };
        let span = &after[..j];
        out.push(Snippet {
            file: file.into(),
            line,
            text: span.replace('\n', " "),
            fenced: false,
        });
        line += span.matches('\n').count();
        rest = &after[j + 1..];
    }
    out.sort_by_key(|s| s.line);
    out
}

/// A line split as a shell would split it, into simple commands of
/// words: quotes and backslashes honoured, a comment dropped, pipes and
/// `&&`, `||`, `;`, `&` separating commands, redirections dropped.
fn simple_commands(line: &str) -> Result<Vec<Vec<String>>, String> {
    let mut words: Vec<(String, bool)> = Vec::new(); // (word, quoted)
    let mut chars = line.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let Some(&c) = chars.peek() else { break };
        if c == '#' {
            break;
        }
        let mut w = String::new();
        let mut quoted = false;
        while let Some(&c) = chars.peek() {
            if c.is_whitespace() {
                break;
            }
            chars.next();
            match c {
                '\'' => {
                    quoted = true;
                    loop {
                        match chars.next() {
                            Some('\'') => break,
                            Some(c) => w.push(c),
                            None => return Err("unclosed '".into()),
                        }
                    }
                }
                '"' => {
                    quoted = true;
                    loop {
                        match chars.next() {
                            Some('"') => break,
                            Some('\\') => w.extend(chars.next()),
                            Some(c) => w.push(c),
                            None => return Err("unclosed \"".into()),
                        }
                    }
                }
                '\\' => w.extend(chars.next()),
                c => w.push(c),
            }
        }
        words.push((w, quoted));
    }
    let mut cmds = vec![Vec::new()];
    let mut skip_next = false;
    for (w, quoted) in words {
        if skip_next {
            skip_next = false;
            continue;
        }
        if !quoted && ["|", "||", "&&", "&", ";"].contains(&w.as_str()) {
            cmds.push(Vec::new());
            continue;
        }
        if !quoted {
            let r = w.trim_start_matches(|c: char| c.is_ascii_digit());
            if let Some(target) = r
                .strip_prefix(">>")
                .or_else(|| r.strip_prefix('>'))
                .or_else(|| r.strip_prefix('<'))
            {
                // `> file` takes the next word; `>file` and `2>&1` do not.
                skip_next = target.is_empty();
                continue;
            }
        }
        let w = match w.strip_suffix(';') {
            Some(head) if !quoted => {
                cmds.last_mut().expect("one").push(head.to_string());
                cmds.push(Vec::new());
                continue;
            }
            _ => w,
        };
        cmds.last_mut().expect("one").push(w);
    }
    cmds.retain(|c| !c.is_empty());
    Ok(cmds)
}

fn is_assignment(w: &str) -> bool {
    w.split_once('=').is_some_and(|(k, _)| {
        !k.is_empty()
            && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            && !k.starts_with(|c: char| c.is_ascii_digit())
    })
}

fn is_binary(w: &str) -> bool {
    w == "ramster" || w.ends_with("/ramster")
}

/// A simple command's words after the prompt, `sudo` and environment
/// assignments, and the assignments.
fn strip_prefix(words: &[String]) -> (Vec<(String, String)>, &[String]) {
    let mut env = Vec::new();
    let mut i = 0;
    while i < words.len() {
        let w = words[i].as_str();
        if w == "$" || w == "env" {
            i += 1;
        } else if w == "sudo" {
            i += 1;
            while words.get(i).is_some_and(|w| w.starts_with('-')) {
                i += 1;
            }
        } else if is_assignment(w) {
            let (k, v) = w.split_once('=').expect("an assignment");
            env.push((k.to_string(), v.to_string()));
            i += 1;
        } else {
            break;
        }
    }
    (env, &words[i..])
}

/// The arguments a simple command gives the binary, if it runs it: the
/// binary itself, `cargo run [...] -- ARGS` of the workspace's default
/// package, or the binary run through docker, compose or kubectl.
fn binary_args(words: &[String]) -> Option<Vec<String>> {
    let (first, rest) = words.split_first()?;
    if is_binary(first) {
        return Some(rest.to_vec());
    }
    if first == "cargo" && rest.first().is_some_and(|w| w == "run") {
        let with_value = [
            "-p",
            "--package",
            "--bin",
            "--example",
            "-F",
            "--features",
            "--profile",
            "--target",
            "-j",
            "--jobs",
            "--manifest-path",
            "--target-dir",
        ];
        let mut it = rest[1..].iter();
        while let Some(w) = it.next() {
            if w == "--" {
                return Some(it.cloned().collect());
            }
            if with_value.contains(&w.as_str()) {
                let v = it.next()?;
                // Another package's or binary's `cargo run` is not ours.
                let names = ["-p", "--package", "--bin", "--example"];
                if names.contains(&w.as_str()) && v != "ramster-node" && v != "ramster" {
                    return None;
                }
            } else if !w.starts_with('-') {
                // cargo hands trailing words to the binary without `--` too.
                return Some(std::iter::once(w).chain(it).cloned().collect());
            }
        }
        return Some(Vec::new());
    }
    let wrappers = ["docker", "docker-compose", "podman", "kubectl"];
    if wrappers.contains(&first.as_str()) {
        if let Some(i) = rest.iter().position(|w| w == "ramster") {
            return Some(rest[i + 1..].to_vec());
        }
        // docker/compose.yaml's `client` service has the binary as its
        // entrypoint: `docker-compose ... run [OPTIONS] client ARGS`.
        let run = rest.iter().position(|w| w == "run")?;
        let mut it = rest[run + 1..].iter();
        let takes_value = [
            "-v",
            "--volume",
            "-e",
            "--env",
            "-w",
            "--workdir",
            "-u",
            "--user",
        ];
        while let Some(w) = it.next() {
            if takes_value.contains(&w.as_str()) {
                it.next();
            } else if !w.starts_with('-') {
                return (w == "client").then(|| it.cloned().collect());
            }
        }
    }
    None
}

/// A word that stands for a value the reader supplies.
fn is_placeholder(w: &str) -> bool {
    (w.starts_with('<') && w.ends_with('>'))
        || w.contains('$')
        || (w.chars().any(|c| c.is_ascii_uppercase())
            && w.len() >= 2
            && w.chars()
                .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || "_:/.".contains(c)))
}

/// Upper-case runs of two or more characters inside a word
/// (`OWNER/api.sock`), replaced by a name.
fn fill_inner(w: &str) -> String {
    let mut out = String::new();
    let mut run = String::new();
    let flush = |run: &mut String, out: &mut String| {
        let letters = run.chars().any(|c| c.is_ascii_uppercase());
        if run.len() >= 2 && letters && run.chars().all(|c| !c.is_ascii_lowercase()) {
            out.push('x');
        } else {
            out.push_str(run);
        }
        run.clear();
    };
    for c in w.chars() {
        if c.is_ascii_alphanumeric() || c == '_' {
            run.push(c);
        } else {
            flush(&mut run, &mut out);
            out.push(c);
        }
    }
    flush(&mut run, &mut out);
    out
}

/// What one word of a doc command is checked as.
enum Word {
    /// Left out (an empty optional part).
    Drop,
    /// Each of these must parse (`zram|memcached`).
    Each(Vec<String>),
    /// One of these must parse (a placeholder).
    Any(Vec<String>),
}

fn word(w: &str) -> Word {
    // `...`: more of the same, or a flag's value (`--corpus ...`).
    if w == "..." || w == "\u{2026}" {
        let mut options = vec![OMITTED.to_string()];
        options.extend(SAMPLES.iter().map(|s| s.to_string()));
        return Word::Any(options);
    }
    // An optional part, `[--timeout` ... `SECS]` or `[/health/ready]`;
    // an IPv6 address (`[::1]:7801`) keeps its brackets.
    let mut w = w;
    if let Some(inner) = w.strip_prefix('[').and_then(|i| i.strip_suffix(']'))
        && !inner.contains(['[', ']'])
    {
        w = inner;
    }
    if let Some(inner) = w.strip_prefix('[')
        && !inner.contains(']')
    {
        w = inner;
    }
    if let Some(inner) = w.strip_suffix(']')
        && !inner.contains('[')
    {
        w = inner;
    }
    if w.is_empty() {
        return Word::Drop;
    }
    // `--flag=VALUE`
    if w.starts_with('-')
        && let Some((flag, value)) = w.split_once('=')
    {
        let with_flag = |vs: Vec<String>| vs.into_iter().map(|v| format!("{flag}={v}")).collect();
        return match word(value) {
            Word::Drop => Word::Each(vec![flag.to_string()]),
            Word::Each(vs) => Word::Each(with_flag(vs)),
            Word::Any(vs) => Word::Any(with_flag(vs)),
        };
    }
    if w.contains('|') {
        return Word::Each(w.split('|').map(fill_inner).collect());
    }
    if is_placeholder(w) {
        return Word::Any(SAMPLES.iter().map(|s| s.to_string()).collect());
    }
    Word::Each(vec![fill_inner(w)])
}

/// Every way of picking one option per position, at most
/// COMBINATIONS_MAX of them.
fn product(positions: &[Vec<String>]) -> Vec<Vec<String>> {
    let mut combos: Vec<Vec<String>> = vec![Vec::new()];
    for options in positions {
        combos = combos
            .into_iter()
            .flat_map(|c| {
                options.iter().map(move |o| {
                    let mut c = c.clone();
                    c.push(o.clone());
                    c
                })
            })
            .take(COMBINATIONS_MAX)
            .collect();
    }
    combos
}

/// How clap took one argument list.
enum Parsed {
    Fine,
    Refused(ErrorKind, String),
}

fn parse(args: &[String], env: &[(String, String)]) -> Parsed {
    for (k, v) in env {
        // SAFETY: this file's one test runs on one thread, and nothing
        // else in the process reads the environment meanwhile.
        unsafe { std::env::set_var(k, v) };
    }
    let got =
        Cli::try_parse_from(std::iter::once("ramster".to_string()).chain(args.iter().cloned()));
    for (k, _) in env {
        // SAFETY: as above.
        unsafe { std::env::remove_var(k) };
    }
    match got {
        Ok(_) => Parsed::Fine,
        Err(e) => match e.kind() {
            // What the prose leaves to the reader, or asks to be shown.
            ErrorKind::MissingRequiredArgument
            | ErrorKind::MissingSubcommand
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            | ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion => Parsed::Fine,
            // An example host name that does not resolve here.
            ErrorKind::ValueValidation if e.to_string().contains("cannot resolve") => Parsed::Fine,
            kind => Parsed::Refused(kind, e.to_string()),
        },
    }
}

/// Whether every alternative a command shows parses with some filling-in
/// of its placeholders; else the first refusal and the arguments it was
/// for.
fn check(args: &[String], env: &[(String, String)]) -> Result<(), (Vec<String>, String)> {
    let words: Vec<Word> = args.iter().map(|w| word(w)).collect();
    // Alternatives as one position each, placeholders as one fixed slot.
    let each: Vec<Vec<String>> = words
        .iter()
        .filter_map(|w| match w {
            Word::Each(vs) => Some(vs.clone()),
            Word::Any(_) => Some(vec![String::new()]),
            Word::Drop => None,
        })
        .collect();
    let any: Vec<Vec<String>> = words
        .iter()
        .filter_map(|w| match w {
            Word::Any(vs) => Some(vs.clone()),
            _ => None,
        })
        .collect();
    let slots: Vec<bool> = words
        .iter()
        .filter_map(|w| match w {
            Word::Each(_) => Some(false),
            Word::Any(_) => Some(true),
            Word::Drop => None,
        })
        .collect();
    for variant in product(&each) {
        let mut refusal = None;
        let fine = product(&any).into_iter().any(|fill| {
            let mut fill = fill.into_iter();
            let argv: Vec<String> = variant
                .iter()
                .zip(&slots)
                .map(|(v, &slot)| {
                    if slot {
                        fill.next().expect("a value")
                    } else {
                        v.clone()
                    }
                })
                .filter(|a| a != OMITTED)
                .collect();
            match parse(&argv, env) {
                Parsed::Fine => true,
                Parsed::Refused(kind, msg) => {
                    refusal.get_or_insert((argv, format!("{kind:?}: {msg}")));
                    false
                }
            }
        });
        if !fine {
            return Err(refusal.expect("at least one filling-in"));
        }
    }
    Ok(())
}

/// Checks every command in `snippets`; the number checked per file, or
/// every failure.
fn check_all(snippets: &[Snippet]) -> Result<BTreeMap<String, usize>, Vec<String>> {
    let mut counts = BTreeMap::new();
    let mut failures = Vec::new();
    for s in snippets {
        if let Some((_, _, why)) = NOT_COMMANDS
            .iter()
            .find(|(f, text, _)| *f == s.file && s.text.contains(text))
        {
            println!("{}:{}: not a command: {why}", s.file, s.line);
            continue;
        }
        let cmds = match simple_commands(&s.text) {
            Ok(c) => c,
            // Only a line that names the binary must split: code blocks
            // also show file layouts and prose.
            Err(e) if s.fenced && s.text.split_whitespace().any(is_binary) => {
                failures.push(format!(
                    "{}:{}: cannot split `{}`: {e}",
                    s.file, s.line, s.text
                ));
                continue;
            }
            Err(_) => continue,
        };
        let mut found = false;
        let mut mentions = false;
        for words in &cmds {
            let (env, words) = strip_prefix(words);
            mentions |= words.iter().any(|w| is_binary(w));
            let Some(args) = binary_args(words) else {
                continue;
            };
            // A span that only names the binary (`ramster`, `/usr/bin/ramster`)
            // is not a command line.
            if !s.fenced && args.is_empty() {
                continue;
            }
            found = true;
            *counts.entry(s.file.clone()).or_insert(0) += 1;
            println!("{}:{}: ramster {}", s.file, s.line, args.join(" "));
            let env: Vec<_> = env
                .into_iter()
                .filter(|(k, _)| k.starts_with("RAMSTER_"))
                .collect();
            if let Err((tried, why)) = check(&args, &env) {
                failures.push(format!(
                    "{}:{}: `{}` does not parse (checked as `ramster {}`): {why}",
                    s.file,
                    s.line,
                    s.text.trim(),
                    tried.join(" ")
                ));
            }
        }
        if s.fenced && mentions && !found {
            failures.push(format!(
                "{}:{}: `{}` names the binary but could not be checked as a command \
                 (fix the line, or add it to NOT_COMMANDS with the reason)",
                s.file, s.line, s.text
            ));
        }
    }
    if failures.is_empty() {
        Ok(counts)
    } else {
        Err(failures)
    }
}

fn doc_files() -> Vec<(String, String)> {
    let root = repo_root();
    let mut names = vec!["README.md".to_string()];
    let mut docs: Vec<String> = std::fs::read_dir(root.join("docs"))
        .expect("docs/")
        .map(|e| {
            e.expect("an entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .filter(|n| n.ends_with(".md"))
        .map(|n| format!("docs/{n}"))
        .collect();
    docs.sort();
    names.extend(docs);
    names
        .into_iter()
        .map(|n| {
            let text =
                std::fs::read_to_string(root.join(&n)).unwrap_or_else(|e| panic!("{n}: {e}"));
            (n, text)
        })
        .collect()
}

/// The checker itself first, on lines it must pass and lines it must
/// fail, then every doc. One test: `parse` sets environment variables.
#[test]
fn every_documented_command_line_parses() {
    // Variables of the caller's shell would stand in for missing flags.
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("RAMSTER_") {
            // SAFETY: no other thread of this test binary runs yet.
            unsafe { std::env::remove_var(&k) };
        }
    }

    let good = "\
```
sudo RAMSTER_GSO=no ./target/release/ramster node --name n1 --capacity 1GiB \\
    --join a:1,b:2 ... &   # a comment --no-such-flag
cargo run --release -- demo
ramster cluster drain NAME [--wait] | tee log
docker-compose -f x.yaml run --rm -v /a:/b client bench --socket OWNER/api.sock --phase store
kubectl exec pod-0 -- ramster status -o json
ramster completions bash > /tmp/out
cargo run -p other -- --anything
```
and `ramster bench --peer zram|memcached ...`, `ramster probe`, `/usr/bin/ramster`.
";
    let counts = check_all(&snippets("good.md", good)).unwrap_or_else(|f| {
        panic!("the checker refuses good lines:\n{}", f.join("\n"));
    });
    assert_eq!(
        counts.get("good.md"),
        Some(&8),
        "commands found in the sample"
    );

    let bad = [
        "ramster node --no-such-flag",
        "ramster nope",
        "ramster status -o yaml",
        "ramster node --capacity lots",
        "RAMSTER_GSO=maybe ramster node",
        "cargo run --release -- demo --bogus",
        "cargo run --release bench --phase stor",
        "ramster cluster drain m1 \\\n  --wiat",
        "ramster bench --peer zram|nope",
        "helm install x charts/ramster",
    ];
    for line in bad {
        let md = format!("```sh\n{line}\n```\n");
        assert!(
            check_all(&snippets("bad.md", &md)).is_err(),
            "the checker passes {line:?}"
        );
    }

    let mut all = Vec::new();
    for (name, text) in doc_files() {
        all.extend(snippets(&name, &text));
    }
    match check_all(&all) {
        Ok(counts) => {
            for (file, n) in &counts {
                println!("{file}: {n} command lines parse");
            }
            for must in ["README.md", "docs/operating.md", "docs/swap.md"] {
                assert!(
                    counts.get(must).is_some_and(|&n| n > 0),
                    "no command found in {must}: is the extraction broken?"
                );
            }
        }
        Err(failures) => panic!(
            "documented command lines that the binary refuses:\n{}",
            failures.join("\n")
        ),
    }
}
