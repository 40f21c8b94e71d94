//! Where the settings come from: the command line, then the environment, then the defaults.
//!
//! Two rules of the original Go service are kept here, before any value is checked: its flags (`-d`,
//! `-p PORT`, `-bind ADDR`, written the ways Go's `flag` package accepts them) still work, and a
//! variable set to an empty (or blank) value counts as unset, so its default applies. Both hold for
//! every setting, because they are applied to the command as a whole rather than to each field.

use std::ffi::{OsStr, OsString};

use clap::parser::ValueSource;
use clap::{CommandFactory, FromArgMatches};

use super::Args;

/// The original's flag that Go spells with one dash and clap cannot: clap reads `-bind` as the
/// short flags `-b -i -n -d`. (`-d` and `-p` are short flags here, `--d` and `--p` their aliases.)
const GO_LONG_FLAGS: [&str; 1] = ["bind"];

impl Args {
    /// The settings of this process: its command line and its environment. Exits (2, with clap's
    /// message) on a command line that cannot be parsed, and prints `--help` and `--version`.
    pub fn from_process() -> Args {
        Args::parse_with_env(std::env::args_os(), |name| std::env::var_os(name)).unwrap_or_else(|err| err.exit())
    }

    /// The settings given by `argv` (the program name first) and the environment `env`.
    ///
    /// A flag on the command line wins over its variable; a variable that is unset, empty or only
    /// white space leaves the flag's default. The environment is taken from `env`, not read by clap,
    /// so that tests can give one; `--help` still shows each flag's variable.
    pub fn parse_with_env<I, T>(argv: I, env: impl Fn(&str) -> Option<OsString>) -> Result<Args, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString>,
    {
        let argv = go_style_flags(argv);
        // Help, version and command-line mistakes come from the whole command, which names each
        // flag's variable; its matches also tell which flags the command line set.
        let given = Args::command().try_get_matches_from(&argv)?;

        // The variables' values become flags placed before the command line's own: a flag the
        // command line also gives is left out, so the command line wins.
        let mut full: Vec<OsString> = argv.iter().take(1).cloned().collect();
        let command = Args::command();
        for arg in command.get_arguments() {
            let (Some(name), Some(long)) = (arg.get_env(), arg.get_long()) else { continue };
            if given.value_source(arg.get_id().as_str()) == Some(ValueSource::CommandLine) {
                continue;
            }
            let Some(name) = name.to_str() else { continue };
            match env(name) {
                Some(value) if !is_blank(&value) => {
                    let mut flag = OsString::from(format!("--{long}="));
                    flag.push(value);
                    full.push(flag);
                }
                _ => {}
            }
        }
        full.extend(argv.into_iter().skip(1));
        let matches = Args::command().mut_args(|arg| arg.env(None::<&str>)).try_get_matches_from(full)?;
        Args::from_arg_matches(&matches)
    }
}

/// Whether a variable's value means "unset": empty or only white space (every check trims).
fn is_blank(value: &OsStr) -> bool {
    value.to_str().is_some_and(|text| text.trim().is_empty())
}

/// `argv` with the original's single-dash long flags (`-bind ADDR`, `-bind=ADDR`) written as clap
/// reads them (`--bind`). Stops at `--`, after which every argument is a value.
fn go_style_flags<I, T>(argv: I) -> Vec<OsString>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString>,
{
    let mut seen_terminator = false;
    argv.into_iter()
        .map(Into::into)
        .map(|arg| {
            if seen_terminator {
                return arg;
            }
            let Some(text) = arg.to_str() else { return arg };
            if text == "--" {
                seen_terminator = true;
                return arg;
            }
            let Some(rest) = text.strip_prefix('-').filter(|rest| !rest.starts_with('-')) else { return arg };
            let name = rest.split_once('=').map_or(rest, |(name, _)| name);
            if GO_LONG_FLAGS.contains(&name) { OsString::from(format!("-{text}")) } else { arg }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::config::{BackfillCommand, Command};

    const PROGRAM: &str = "dynamodb-stream-consumer";

    /// `argv` (without the program name) parsed with exactly the variables `vars`.
    fn parse(argv: &[&str], vars: &[(&str, &str)]) -> Args {
        try_parse(argv, vars).unwrap_or_else(|err| panic!("{argv:?} with {vars:?} does not parse: {err}"))
    }

    fn try_parse(argv: &[&str], vars: &[(&str, &str)]) -> Result<Args, clap::Error> {
        let vars: HashMap<String, OsString> = vars.iter().map(|(k, v)| ((*k).to_owned(), OsString::from(v))).collect();
        let argv = std::iter::once(PROGRAM).chain(argv.iter().copied());
        Args::parse_with_env(argv, |name| vars.get(name).cloned())
    }

    /// Every variable a flag reads, from the `env` of the flags' declarations.
    fn variables() -> Vec<String> {
        Args::command()
            .get_arguments()
            .filter_map(|arg| arg.get_env())
            .map(|name| name.to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn every_variable_belongs_to_a_long_flag() {
        // A variable's value reaches its flag as `--long=value`: a flag without a long name would
        // silently lose its variable.
        for arg in Args::command().get_arguments().filter(|arg| arg.get_env().is_some()) {
            assert!(arg.get_long().is_some(), "{:?} has a variable but no long flag", arg.get_id());
        }
        let variables = variables();
        for name in ["DYNAMODB_TABLES", "PORT", "BIND", "DEBUG", "START_FROM_LATEST", "NATS_PASSWORD", "MAX_LEASES"] {
            assert!(variables.iter().any(|v| v == name), "{name} missing from {variables:?}");
        }
    }

    #[test]
    fn an_empty_or_blank_variable_leaves_the_default_for_every_setting() {
        let defaults = parse(&[], &[]);
        for name in variables() {
            for blank in ["", "  ", "\t"] {
                assert_eq!(parse(&[], &[(&name, blank)]), defaults, "{name}={blank:?} must mean unset");
            }
            // The same variable with a value does reach its flag, so the comparison above can fail.
            assert_ne!(parse(&[], &[(&name, "x1")]), defaults, "{name}=x1 must be read");
        }
    }

    #[test]
    fn all_variables_empty_validate_to_the_default_configuration() {
        let mut vars: Vec<(String, &str)> = variables().into_iter().map(|name| (name, "")).collect();
        vars.retain(|(name, _)| name != "DYNAMODB_TABLES");
        vars.push(("DYNAMODB_TABLES".to_owned(), "orders"));
        let vars: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (k.as_str(), *v)).collect();
        let mut blank = parse(&[], &vars).validate().expect("empty variables are valid");
        let unset = parse(&[], &[("DYNAMODB_TABLES", "orders")]).validate().expect("valid");
        // Each validation draws its own random lease instance.
        blank.lease.instance.clone_from(&unset.lease.instance);
        assert_eq!(format!("{blank:?}"), format!("{unset:?}"));
        assert_eq!(blank.port, 8080);
        assert!(!blank.debug);
    }

    #[test]
    fn the_command_line_wins_over_the_environment() {
        let args = parse(&["-p", "9090", "--aws-region=eu-west-1"], &[("PORT", "1234"), ("AWS_REGION", "us-east-1")]);
        assert_eq!(args.port, "9090");
        assert_eq!(args.aws_region, "eu-west-1");
        let args = parse(&[], &[("PORT", "1234"), ("DEBUG", "yes")]);
        assert_eq!((args.port.as_str(), args.debug.as_str()), ("1234", "yes"));
    }

    #[test]
    fn the_go_services_flags_in_every_spelling_of_gos_flag_package() {
        for argv in [&["-d"][..], &["--d"], &["-d=true"], &["--d=1"], &["--debug"], &["--debug=yes"]] {
            let debug = parse(argv, &[]).debug;
            assert_eq!(parse(&[], &[("DEBUG", &debug)]).validate_debug(), Some(true), "{argv:?} gave {debug:?}");
        }
        assert_eq!(parse(&["-d=false"], &[]).debug, "false");
        assert_eq!(parse(&["-d=false"], &[("DEBUG", "true")]).debug, "false", "the flag wins");
        for argv in
            [&["-p", "9090"][..], &["-p=9090"], &["-p9090"], &["--p", "9090"], &["--p=9090"], &["--port", "9090"]]
        {
            assert_eq!(parse(argv, &[]).port, "9090", "{argv:?}");
        }
        for argv in [&["-bind", "127.0.0.1"][..], &["-bind=127.0.0.1"], &["--bind", "127.0.0.1"], &["--bind=127.0.0.1"]]
        {
            assert_eq!(parse(argv, &[]).bind, "127.0.0.1", "{argv:?}");
        }
        let args = parse(&["-d", "-p", "9090", "-bind", "::1"], &[]);
        assert_eq!((args.debug.as_str(), args.port.as_str(), args.bind.as_str()), ("true", "9090", "::1"));
    }

    #[test]
    fn the_go_flags_leave_the_backfill_command_working() {
        let args = parse(&["-d", "-bind", "127.0.0.1", "-p", "1", "backfill", "request", "orders"], &[]);
        assert_eq!(
            args.command,
            Some(Command::Backfill { action: BackfillCommand::Request { table: "orders".into() } })
        );
        assert_eq!((args.debug.as_str(), args.port.as_str(), args.bind.as_str()), ("true", "1", "127.0.0.1"));
        // After `--` nothing is a flag: a (valid) table named `-bind` stays itself.
        let args = parse(&["backfill", "request", "--", "-bind"], &[]);
        assert_eq!(
            args.command,
            Some(Command::Backfill { action: BackfillCommand::Request { table: "-bind".into() } })
        );
    }

    #[test]
    fn help_and_command_line_mistakes_still_reach_clap() {
        let help = try_parse(&["--help"], &[]).expect_err("help is shown, not parsed");
        assert_eq!(help.kind(), clap::error::ErrorKind::DisplayHelp);
        let text = help.to_string();
        assert!(text.contains("[env: PORT=]") && text.contains("-d, --debug"), "{text}");
        let unknown = try_parse(&["-x"], &[]).expect_err("unknown flag");
        assert_eq!(unknown.kind(), clap::error::ErrorKind::UnknownArgument);
        // A lone `-d` takes no value: what follows it is not read as one (Go stops parsing there).
        assert!(try_parse(&["-d", "false"], &[]).is_err());
    }

    impl Args {
        /// `DEBUG` as validation reads it, or `None` if it is refused.
        fn validate_debug(&self) -> Option<bool> {
            let mut check = super::super::checker::Checker::default();
            let debug = check.bool("DEBUG", &self.debug);
            check.0.is_empty().then_some(debug)
        }
    }
}
