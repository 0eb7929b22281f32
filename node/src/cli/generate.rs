//! `ramster completions SHELL` and `ramster man [--out-dir DIR]`: shell
//! completion scripts and man pages, generated from the same clap
//! `Command` that parses the command line, so that a flag added, renamed or
//! moved under a heading shows up in them without anyone editing a file.
//! The .deb ships what these print (scripts/build-deb.sh).

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, CommandFactory};
use clap_complete::Shell;

use super::Cli;

/// The name the scripts complete and the pages are titled by: the binary's.
const BIN: &str = "ramster";

#[derive(Args, Debug)]
pub struct CompletionsArgs {
    /// The shell to print the completion script for.
    #[arg(value_enum)]
    pub shell: Shell,
}

#[derive(Args, Debug)]
pub struct ManArgs {
    /// Write ramster.1 and one page per subcommand (ramster-node.1,
    /// ramster-cluster-drain.1, ...) into DIR, instead of printing
    /// ramster.1.
    #[arg(long, value_name = "DIR")]
    pub out_dir: Option<PathBuf>,
}

/// The command line as clap sees it, names and all.
fn command() -> clap::Command {
    Cli::command()
}

/// The completion script for `shell`.
pub fn completion_script(shell: Shell) -> Vec<u8> {
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut command(), BIN, &mut script);
    script
}

/// ramster.1: the top-level page, which lists the subcommands.
pub fn man_page() -> anyhow::Result<Vec<u8>> {
    let mut page = Vec::new();
    clap_mangen::Man::new(command())
        .render(&mut page)
        .context("rendering ramster.1")?;
    Ok(page)
}

/// Writes ramster.1 and a page for every subcommand, nested ones named
/// after their path (ramster-cluster-drain.1); the files it wrote.
pub fn write_man_pages(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    clap_mangen::generate_to(command(), dir)
        .with_context(|| format!("writing man pages into {}", dir.display()))?;
    // The same walk as generate_to's (visible subcommands, no `help`), so
    // that pages a directory kept from an older binary are not reported.
    let mut cmd = command().disable_help_subcommand(true);
    cmd.build();
    let mut files = Vec::new();
    page_files(&cmd, dir, &mut files);
    files.sort();
    Ok(files)
}

fn page_files(cmd: &clap::Command, dir: &Path, out: &mut Vec<PathBuf>) {
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        page_files(sub, dir, out);
    }
    let title = cmd.get_display_name().unwrap_or_else(|| cmd.get_name());
    out.push(dir.join(format!("{title}.1")));
}

pub fn run_completions(args: CompletionsArgs) -> anyhow::Result<()> {
    // Rendered whole before writing: clap_complete panics on a failed
    // write, and `ramster completions bash | head` is a closed pipe.
    write_stdout(&completion_script(args.shell))
}

pub fn run_man(args: ManArgs) -> anyhow::Result<()> {
    match args.out_dir {
        None => write_stdout(&man_page()?),
        Some(dir) => {
            for path in write_man_pages(&dir)? {
                println!("{}", path.display());
            }
            Ok(())
        }
    }
}

fn write_stdout(bytes: &[u8]) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(bytes)
        .and_then(|()| out.flush())
        .context("writing to stdout")
}

/// The node's settings as a markdown reference (docs/configuration.md),
/// from the same `Command` that parses them: heading by heading, each
/// flag with its environment variable, config-file key and help (which
/// states the default). A test keeps the page equal to this.
pub fn configuration_reference() -> String {
    let node = command()
        .find_subcommand("node")
        .expect("ramster has a node subcommand")
        .clone();
    let mut out = String::from(
        "# Configuration reference\n\n\
         Every setting of `ramster node`, generated from its command line\n\
         (`ramster node --help` prints the same). A setting comes from, in\n\
         order: the flag, the environment variable, the key in the `--config`\n\
         TOML file (the flag's name without `--`), the default;\n\
         `ramster node --print-config` shows the merged settings and where\n\
         each came from. Booleans take true/false, yes/no, on/off or 1/0.\n\n\
         Sizes (capacity, donate, an export's size) read as Kubernetes reads\n\
         memory quantities: `Ki`, `Mi`, `Gi`, `Ti` (or `KiB`, `MiB`, ...) are\n\
         powers of 1024, `k`, `M`, `G`, `T` (or `KB`, `MB`, ...) powers of\n\
         1000, and a bare number is bytes; `1.5Gi` is fine. So `2Gi` is\n\
         2147483648 bytes and `2G` is 2000000000. Units ignore case, except\n\
         that a lone `m` is refused: Kubernetes reads `512m` as thousandths\n\
         of a byte.\n",
    );
    let mut headings: Vec<Option<&str>> = Vec::new();
    for arg in node.get_arguments() {
        if !headings.contains(&arg.get_help_heading()) {
            headings.push(arg.get_help_heading());
        }
    }
    for heading in headings {
        out.push_str(&format!("\n## {}\n\n", heading.unwrap_or("Other")));
        out.push_str("| flag | environment | file key | what, and its default |\n");
        out.push_str("|---|---|---|---|\n");
        for arg in node
            .get_arguments()
            .filter(|a| a.get_help_heading() == heading)
        {
            let Some(long) = arg.get_long() else { continue };
            if long == "help" {
                continue;
            }
            let env = arg
                .get_env()
                .map(|e| format!("`{}`", e.to_string_lossy()))
                .unwrap_or_default();
            // The file and the flags that are about the command itself.
            let key = if matches!(long, "config" | "print-config") {
                String::new()
            } else {
                format!("`{long}`")
            };
            let help = arg
                .get_long_help()
                .or(arg.get_help())
                .map(|h| h.to_string())
                .unwrap_or_default()
                .replace('\n', " ")
                .replace('|', "\\|");
            out.push_str(&format!("| `--{long}` | {env} | {key} | {help} |\n"));
        }
    }
    out
}

#[cfg(test)]
mod tests {

    /// docs/configuration.md is what the command line says; after a flag
    /// changes, `RAMSTER_BLESS=1 cargo test -p ramster-node --lib
    /// configuration_reference` writes it again.
    #[test]
    fn the_configuration_reference_is_the_command_lines() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join("docs")
            .join("configuration.md");
        let want = configuration_reference();
        if std::env::var_os("RAMSTER_BLESS").is_some() {
            std::fs::write(&path, &want).unwrap();
        }
        let have = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            have == want,
            "{} is not the command line's; RAMSTER_BLESS=1 cargo test -p ramster-node \
             --lib configuration_reference writes it",
            path.display()
        );
    }

    use super::*;

    /// Every visible subcommand's path below `ramster`, nested ones
    /// included: ["demo"], ..., ["cluster", "drain"], ...
    fn subcommand_paths() -> Vec<Vec<String>> {
        fn walk(cmd: &clap::Command, prefix: &[String], out: &mut Vec<Vec<String>>) {
            for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
                let mut path = prefix.to_vec();
                path.push(sub.get_name().to_string());
                walk(sub, &path, out);
                out.push(path);
            }
        }
        let mut out = Vec::new();
        walk(&command(), &[], &mut out);
        out
    }

    /// The page text with roff's escaped hyphens (`\-`) plain again.
    fn unroff(page: &[u8]) -> String {
        String::from_utf8(page.to_vec())
            .expect("man page is UTF-8")
            .replace("\\-", "-")
    }

    #[test]
    fn bash_completion_names_every_subcommand() {
        let script = String::from_utf8(completion_script(Shell::Bash)).unwrap();
        let words: std::collections::HashSet<&str> = script
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '-' || c == '_'))
            .collect();
        let paths = subcommand_paths();
        assert!(paths.len() > 10, "too few subcommands found: {paths:?}");
        for path in paths {
            let name = path.last().unwrap().as_str();
            assert!(
                words.contains(name),
                "bash completion does not offer `{}`",
                path.join(" ")
            );
        }
        assert!(
            script.contains("complete -F _ramster"),
            "script does not register itself"
        );
    }

    #[test]
    fn every_shell_gets_a_script() {
        for shell in [
            Shell::Bash,
            Shell::Zsh,
            Shell::Fish,
            Shell::Elvish,
            Shell::PowerShell,
        ] {
            let script = String::from_utf8(completion_script(shell)).unwrap();
            assert!(
                script.contains("cluster"),
                "{shell} script lacks the subcommands"
            );
        }
    }

    #[test]
    fn bash_accepts_the_completion_script() {
        let Ok(status) = std::process::Command::new("bash").arg("--version").output() else {
            eprintln!("no bash here: bash -n not run");
            return;
        };
        assert!(status.status.success());
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("ramster.bash");
        std::fs::write(&file, completion_script(Shell::Bash)).unwrap();
        let syntax = std::process::Command::new("bash")
            .arg("-n")
            .arg(&file)
            .output()
            .unwrap();
        assert!(
            syntax.status.success(),
            "bash -n: {}",
            String::from_utf8_lossy(&syntax.stderr)
        );
        // Sourced, it registers a completion for the command.
        let registered = std::process::Command::new("bash")
            .arg("-c")
            .arg(format!(". '{}' && complete -p ramster", file.display()))
            .output()
            .unwrap();
        assert!(
            registered.status.success(),
            "sourcing the script: {}",
            String::from_utf8_lossy(&registered.stderr)
        );
    }

    #[test]
    fn node_page_documents_every_long_flag() {
        let mut cli = command();
        cli.build();
        let node = cli
            .find_subcommand("node")
            .expect("a node subcommand")
            .clone();
        let mut page = Vec::new();
        clap_mangen::Man::new(node.clone())
            .render(&mut page)
            .unwrap();
        let page = unroff(&page);
        let flags: Vec<&str> = node
            .get_arguments()
            .filter(|a| !a.is_hide_set())
            .filter_map(|a| a.get_long())
            .collect();
        assert!(flags.len() > 20, "too few long flags found: {flags:?}");
        for flag in flags {
            assert!(
                page.contains(&format!("--{flag}")),
                "ramster-node.1 lacks --{flag}"
            );
        }
    }

    #[test]
    fn top_page_lists_the_subcommands() {
        let page = unroff(&man_page().unwrap());
        assert!(
            page.starts_with(".ie") || page.contains(".TH ramster"),
            "not a man page"
        );
        for path in subcommand_paths().iter().filter(|p| p.len() == 1) {
            assert!(
                page.contains(&format!("ramster-{}", path[0])),
                "ramster.1 lacks {}",
                path[0]
            );
        }
    }

    #[test]
    fn out_dir_gets_a_page_per_subcommand() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("man1");
        let written = write_man_pages(&out).unwrap();
        let mut want: Vec<PathBuf> = subcommand_paths()
            .iter()
            .map(|p| out.join(format!("ramster-{}.1", p.join("-"))))
            .collect();
        want.push(out.join("ramster.1"));
        want.sort();
        assert_eq!(written, want);
        let mut on_disk: Vec<PathBuf> = std::fs::read_dir(&out)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        on_disk.sort();
        assert_eq!(on_disk, want);
        for name in [
            "ramster-node.1",
            "ramster-status.1",
            "ramster-cluster-drain.1",
        ] {
            let page = std::fs::read_to_string(out.join(name)).unwrap();
            assert!(page.contains(".TH"), "{name} is not a man page");
        }
    }
}
