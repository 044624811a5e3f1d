//! The daemons' configuration: every flag of a daemon's command can also come from an
//! environment variable `TERN_<FLAG>` (`--data-dir` is `TERN_DATA_DIR`, `--disk` `TERN_DISK`) or from a TOML
//! file given with `--config FILE`, whose keys are the flags' long
//! names (`data-dir = "/var/lib/tern"`; `disk = ["sda=/dev/vda", ...]` for a repeated
//! flag; `true` for a switch). A flag on the command line wins over its variable, which
//! wins over the file, which wins over the default.

use clap::{ArgAction, Command};
use std::ffi::OsString;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {path}: {reason}")]
    File { path: String, reason: String },
}

/// Gives every argument of every subcommand of `cmd` its `TERN_<FLAG>` variable (where it
/// has none yet) and a `--config FILE` option.
pub fn with_env(cmd: Command) -> Command {
    cmd.mut_subcommands(|sub| {
        sub.mut_args(|a| {
            if a.get_env().is_some() || a.is_positional() || a.get_id() == "help" || a.get_id() == "version" {
                return a;
            }
            let flag = a.get_long().unwrap_or(a.get_id().as_str());
            let name = format!("TERN_{}", flag.to_uppercase().replace('-', "_"));
            a.env(name)
        })
        .arg(clap::Arg::new("config").long("config").value_name("FILE").help(
            "TOML file of flags (keys are the long flag names); flags and TERN_* variables win over it",
        ))
    })
}

/// Parses the process's arguments as `C` the way every daemon does: `TERN_*` variables and
/// `--config FILE` as [`with_env`] and [`merged_args`] describe. Exits (2) with clap's usage
/// message on a bad argument, saying which variable or file key a bad value came from, and
/// with the file's problem on a bad file.
pub fn parse<C: clap::Parser>() -> C {
    let cmd = with_env(C::command());
    let argv: Vec<OsString> = std::env::args_os().collect();
    let merged = match merged_args(&cmd, argv.clone()) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    };
    let matches = cmd.clone().try_get_matches_from(merged).unwrap_or_else(|e| {
        let _ = e.print();
        if let Some(source) = bad_value_source(&cmd, &argv, &e) {
            eprintln!("(that value came from {source})");
        }
        std::process::exit(e.exit_code());
    });
    C::from_arg_matches(&matches).unwrap_or_else(|e| e.exit())
}

/// Where the value clap refused came from when the command line did not give it: the
/// flag's `TERN_*` variable, or the config file's key.
fn bad_value_source(cmd: &Command, argv: &[OsString], e: &clap::Error) -> Option<String> {
    use clap::error::{ContextKind, ContextValue};
    let ContextValue::String(arg) = e.get(ContextKind::InvalidArg)? else { return None };
    let flag = arg.strip_prefix("--")?.split([' ', '=']).next()?;
    if given_on_command_line(argv, flag) {
        return None;
    }
    let sub = argv.get(1).and_then(|s| s.to_str()).and_then(|s| cmd.find_subcommand(s))?;
    let a = sub.get_arguments().find(|a| a.get_long() == Some(flag))?;
    if let Some(var) = a.get_env().filter(|v| std::env::var_os(v).is_some_and(|x| !x.is_empty())) {
        return Some(format!("the environment variable {}", var.to_string_lossy()));
    }
    let path = config_path(argv)?;
    // The key as the file spells it (`data_dir` for `--data-dir`), and its line.
    let text = std::fs::read_to_string(&path).unwrap_or_default();
    let found = [flag.to_string(), flag.replace('-', "_")]
        .into_iter()
        .find_map(|k| key_line(&text, &k).map(|line| (k, line)));
    Some(match found {
        Some((key, line)) => format!("key `{key}` (line {line}) of the config file {}", path.display()),
        None => format!("key `{flag}` of the config file {}", path.display()),
    })
}

/// The line (from 1) where a top-level `key = ...` of a TOML file is, bare or quoted.
fn key_line(text: &str, key: &str) -> Option<usize> {
    text.lines()
        .position(|l| {
            let l = l.trim_start();
            let rest = [format!("\"{key}\""), format!("'{key}'"), key.to_string()]
                .into_iter()
                .find_map(|k| l.strip_prefix(k.as_str()).map(str::to_string));
            rest.is_some_and(|r| r.trim_start().starts_with('='))
        })
        .map(|i| i + 1)
}

fn given_on_command_line(argv: &[OsString], flag: &str) -> bool {
    argv.iter()
        .any(|a| a.to_str().is_some_and(|a| a == format!("--{flag}") || a.starts_with(&format!("--{flag}="))))
}

/// `argv` with the config file's flags added where neither the command line nor a
/// variable gives them. `cmd` is the command after [`with_env`].
pub fn merged_args(cmd: &Command, argv: Vec<OsString>) -> Result<Vec<OsString>, ConfigError> {
    let Some(sub) = argv.get(1).and_then(|s| s.to_str()).and_then(|s| cmd.find_subcommand(s)) else {
        return Ok(argv);
    };
    let Some(path) = config_path(&argv) else { return Ok(argv) };
    let err = |reason: String| ConfigError::File { path: path.display().to_string(), reason };
    let text = std::fs::read_to_string(&path).map_err(|e| err(e.to_string()))?;
    let table: toml::Table = text.parse().map_err(|e: toml::de::Error| err(e.to_string()))?;
    let mut out = argv.clone();
    for (key, value) in &table {
        let at = key_line(&text, key).map_or(String::new(), |n| format!("line {n}: "));
        let flag = key.replace('_', "-");
        let Some(arg) = sub.get_arguments().find(|a| a.get_long() == Some(flag.as_str()) && flag != "config")
        else {
            let known: Vec<_> =
                sub.get_arguments().filter_map(|a| a.get_long()).filter(|l| *l != "config").collect();
            return Err(err(format!(
                "{at}unknown key `{key}`; the keys are the flags of `{}`: {}",
                sub.get_name(),
                known.join(", ")
            )));
        };
        let given = given_on_command_line(&argv, &flag);
        // An empty variable gives nothing: the file's value stands.
        let from_env = arg.get_env().is_some_and(|v| std::env::var_os(v).is_some_and(|x| !x.is_empty()));
        if given || from_env {
            continue;
        }
        let switch = matches!(arg.get_action(), ArgAction::SetTrue | ArgAction::SetFalse);
        let values: Vec<&toml::Value> = match value {
            toml::Value::Array(items) => items.iter().collect(),
            v => vec![v],
        };
        for v in values {
            match v {
                toml::Value::Boolean(true) if switch => out.push(format!("--{flag}").into()),
                toml::Value::Boolean(false) if switch => {}
                // `--flag=VALUE`: a value that starts with `-` is the flag's, not taken for a
                // flag of its own (W19-B: `segment-size = "-1"` was said as an unexpected
                // argument, without the key).
                toml::Value::String(s) => out.push(format!("--{flag}={s}").into()),
                toml::Value::Integer(i) => out.push(format!("--{flag}={i}").into()),
                toml::Value::Boolean(b) => out.push(format!("--{flag}={b}").into()),
                other => {
                    return Err(err(format!(
                        "{at}`{key}` = {other}: give a string, a number, true/false or a list of them"
                    )));
                }
            }
        }
    }
    Ok(out)
}

fn config_path(argv: &[OsString]) -> Option<PathBuf> {
    let mut it = argv.iter().filter_map(|a| a.to_str());
    while let Some(a) = it.next() {
        if a == "--config" {
            return it.next().map(PathBuf::from);
        }
        if let Some(p) = a.strip_prefix("--config=") {
            return Some(PathBuf::from(p));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser, Debug)]
    struct Cli {
        #[command(subcommand)]
        cmd: Cmd,
    }

    #[derive(clap::Subcommand, Debug)]
    enum Cmd {
        Serve {
            #[arg(long)]
            data_dir: String,
            #[arg(long, default_value = "60s")]
            every: String,
            #[arg(long)]
            disk: Vec<String>,
            #[arg(long)]
            quiet: bool,
            #[arg(long, default_value = "1")]
            count: u32,
            #[arg(long, default_value = "0")]
            max_rate: u32,
        },
    }

    fn parse(args: &[&str], file: &str) -> Result<Cmd, String> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, file).unwrap();
        let mut argv: Vec<OsString> = args.iter().map(OsString::from).collect();
        argv.extend(["--config".into(), path.into_os_string()]);
        let cmd = with_env(<Cli as clap::CommandFactory>::command());
        let argv = merged_args(&cmd, argv).map_err(|e| e.to_string())?;
        let m = cmd.try_get_matches_from(argv).map_err(|e| e.to_string())?;
        Ok(<Cli as clap::FromArgMatches>::from_arg_matches(&m).map_err(|e| e.to_string())?.cmd)
    }

    #[test]
    fn the_file_fills_what_flags_leave_and_flags_win() {
        let file = "data-dir = \"/from/file\"\nevery = \"5m\"\ndisk = [\"a=/x\", \"b=/y\"]\nquiet = true\n";
        let Cmd::Serve { data_dir, every, disk, quiet, .. } = parse(&["t", "serve"], file).unwrap();
        assert_eq!((data_dir.as_str(), every.as_str(), disk.len(), quiet), ("/from/file", "5m", 2, true));
        let Cmd::Serve { data_dir, every, disk, .. } =
            parse(&["t", "serve", "--data-dir", "/flag", "--disk", "c=/z"], file).unwrap();
        assert_eq!((data_dir.as_str(), every.as_str(), disk), ("/flag", "5m", vec!["c=/z".to_string()]));
        let Cmd::Serve { every, .. } = parse(&["t", "serve", "--data-dir", "/d"], "").unwrap();
        assert_eq!(every, "60s", "the default when neither gives it");
    }

    #[test]
    fn an_unknown_key_is_named_with_the_known_ones() {
        let e = parse(&["t", "serve"], "data-dir = \"/d\"\nretention = 3\n").unwrap_err();
        assert!(
            e.contains("line 2: unknown key `retention`")
                && e.contains("data-dir, every, disk, quiet, count"),
            "{e}"
        );
    }

    #[test]
    fn a_bad_value_names_the_file_key_it_came_from() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "data-dir = \"/d\"\ncount = \"many\"\n").unwrap();
        let cmd = with_env(<Cli as clap::CommandFactory>::command());
        let argv: Vec<OsString> =
            vec!["t".into(), "serve".into(), "--config".into(), path.clone().into_os_string()];
        let merged = merged_args(&cmd, argv.clone()).unwrap();
        let e = cmd.clone().try_get_matches_from(merged).unwrap_err();
        assert_eq!(
            bad_value_source(&cmd, &argv, &e),
            Some(format!("key `count` (line 2) of the config file {}", path.display()))
        );
        // A value that starts with `-` is the key's value, not a flag of its own (W19-B).
        std::fs::write(&path, "data-dir = \"/d\"\nmax_rate = -5\n").unwrap();
        let merged = merged_args(&cmd, argv.clone()).unwrap();
        let e = cmd.clone().try_get_matches_from(merged).unwrap_err();
        assert_eq!(
            bad_value_source(&cmd, &argv, &e),
            Some(format!("key `max_rate` (line 2) of the config file {}", path.display()))
        );
        // The file spells it with an underscore, and quoted: still found.
        std::fs::write(&path, "# c\n\n  \"max_rate\" = \"fast\"\n").unwrap();
        let merged = merged_args(&cmd, argv.clone()).unwrap();
        let e = cmd.clone().try_get_matches_from(merged).unwrap_err();
        let source = bad_value_source(&cmd, &argv, &e);
        assert_eq!(source, Some(format!("key `max_rate` (line 3) of the config file {}", path.display())));
        // Given on the command line, the value's source is plain to see.
        let mut argv = argv;
        argv.extend(["--count".into(), "lots".into()]);
        let merged = merged_args(&cmd, argv.clone()).unwrap();
        let e = cmd.clone().try_get_matches_from(merged).unwrap_err();
        assert_eq!(bad_value_source(&cmd, &argv, &e), None);
    }
}
