//! A recovery plan file: TOML an operator keeps in version control. Every error names the
//! line it is about.
//!
//! ```toml
//! name = "shop"
//! [[group]]                      # groups fail over and start in this order
//! vms = ["db01"]
//! pre = ["/usr/local/bin/fence-primary"]   # optional, run before the group
//! post = ["/usr/local/bin/check-db"]       # optional, run after it
//! manual = "Check replication lag on db01" # optional: waits for `drctl plan continue shop`
//! [[group]]
//! vms = ["app01", "web01"]
//! [vm.db01]                      # optional: where `drctl plan reprotect` sends it back
//! master_target = "https://onprem-mt:7444"
//! location = "original"          # or "alternate"
//! target_disks = ["sda=/var/lib/libvirt/images/db01.img"]
//! sync = "before"                # or "during"
//! ```

use serde::Deserialize;
use std::collections::BTreeMap;
use tern_core::{PlanName, SyncMode, VmName};
use toml::Spanned;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPlan {
    name: Spanned<String>,
    #[serde(default)]
    group: Vec<Spanned<RawStep>>,
    #[serde(default)]
    vm: BTreeMap<Spanned<String>, Spanned<RawTarget>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStep {
    vms: Spanned<Vec<Spanned<String>>>,
    #[serde(default)]
    pre: Vec<Spanned<String>>,
    #[serde(default)]
    post: Vec<Spanned<String>>,
    manual: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTarget {
    master_target: Spanned<String>,
    location: Spanned<String>,
    target_disks: Spanned<Vec<Spanned<String>>>,
    sync: Option<Spanned<String>>,
}

/// One group of a plan: its VMs fail over (or back) together, after the groups before it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub vms: Vec<VmName>,
    pub pre: Vec<String>,
    pub post: Vec<String>,
    pub manual: Option<String>,
}

/// Where `plan reprotect` sends a VM back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub master_target: String,
    pub alternate: bool,
    pub target_disks: Vec<String>,
    pub sync: SyncMode,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub name: PlanName,
    pub steps: Vec<Step>,
    pub targets: BTreeMap<VmName, Target>,
}

impl Plan {
    pub fn vms(&self) -> impl Iterator<Item = &VmName> {
        self.steps.iter().flat_map(|s| s.vms.iter())
    }
}

/// What is wrong with a plan file, and on which line (1-based).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct PlanError {
    pub line: usize,
    pub message: String,
}

/// The line (1-based) of byte `offset` of `text`.
pub fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes().iter().take(offset).filter(|&&b| b == b'\n').count() + 1
}

/// Parses and checks a plan file. `known` says whether a VM is protected here (and why
/// not, when it is not); the check is the caller's, so the parser needs no store.
pub fn parse(text: &str, known: &dyn Fn(&VmName) -> Option<String>) -> Result<Plan, PlanError> {
    let err = |span: std::ops::Range<usize>, message: String| PlanError {
        line: line_of(text, span.start),
        message,
    };
    let raw: RawPlan = toml::from_str(text).map_err(|e| PlanError {
        line: e.span().map_or(1, |s| line_of(text, s.start)),
        message: e.message().trim().to_string(),
    })?;
    let name = PlanName::new(raw.name.get_ref()).map_err(|e| err(raw.name.span(), e.to_string()))?;
    if raw.group.is_empty() {
        return Err(PlanError {
            line: 1,
            message: "a plan needs at least one [[group]] with `vms = [...]`".into(),
        });
    }
    let mut seen: BTreeMap<VmName, usize> = BTreeMap::new();
    let mut steps = Vec::new();
    for (i, g) in raw.group.iter().enumerate() {
        let g_ref = g.get_ref();
        if g_ref.vms.get_ref().is_empty() {
            return Err(err(g_ref.vms.span(), format!("group {} names no VM", i + 1)));
        }
        let mut vms = Vec::new();
        for v in g_ref.vms.get_ref() {
            let vm = VmName::new(v.get_ref()).map_err(|e| err(v.span(), e.to_string()))?;
            if let Some(first) = seen.get(&vm) {
                return Err(err(
                    v.span(),
                    format!("VM {vm} is already in group {first}; a VM is in one group"),
                ));
            }
            if let Some(why) = known(&vm) {
                return Err(err(v.span(), why));
            }
            seen.insert(vm.clone(), i + 1);
            vms.push(vm);
        }
        for c in g_ref.pre.iter().chain(&g_ref.post) {
            if c.get_ref().trim().is_empty() {
                return Err(err(c.span(), "an action is an empty command".into()));
            }
        }
        steps.push(Step {
            vms,
            pre: g_ref.pre.iter().map(|c| c.get_ref().clone()).collect(),
            post: g_ref.post.iter().map(|c| c.get_ref().clone()).collect(),
            manual: g_ref.manual.as_ref().map(|m| m.get_ref().clone()).filter(|m| !m.trim().is_empty()),
        });
    }
    let mut targets = BTreeMap::new();
    for (vm, t) in &raw.vm {
        let name = VmName::new(vm.get_ref()).map_err(|e| err(vm.span(), e.to_string()))?;
        if !seen.contains_key(&name) {
            return Err(err(vm.span(), format!("[vm.{name}] names a VM that is in no group of the plan")));
        }
        let t = t.get_ref();
        let alternate = match t.location.get_ref().as_str() {
            "original" => false,
            "alternate" => true,
            other => {
                return Err(err(
                    t.location.span(),
                    format!("location is original or alternate, not {other:?}"),
                ));
            }
        };
        let sync = match &t.sync {
            None => SyncMode::Before,
            Some(s) => s
                .get_ref()
                .parse()
                .map_err(|_| err(s.span(), format!("sync is before or during, not {:?}", s.get_ref())))?,
        };
        if t.target_disks.get_ref().is_empty() {
            return Err(err(t.target_disks.span(), "target_disks names no disk (NAME=PATH each)".into()));
        }
        for d in t.target_disks.get_ref() {
            if !d.get_ref().contains('=') {
                return Err(err(d.span(), format!("target disk {:?} is not NAME=PATH", d.get_ref())));
            }
        }
        targets.insert(
            name,
            Target {
                master_target: t.master_target.get_ref().clone(),
                alternate,
                target_disks: t.target_disks.get_ref().iter().map(|d| d.get_ref().clone()).collect(),
                sync,
            },
        );
    }
    Ok(Plan { name, steps, targets })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"name = "shop"
[[group]]
vms = ["db01"]
pre = ["/usr/local/bin/fence-primary"]
post = ["/usr/local/bin/check-db"]
manual = "Check replication lag on db01"
[[group]]
vms = ["app01", "web01"]
[vm.db01]
master_target = "https://onprem-mt:7444"
location = "original"
target_disks = ["sda=/var/lib/libvirt/images/db01.img"]
"#;

    fn all_known(_: &VmName) -> Option<String> {
        None
    }

    #[test]
    fn a_plan_file_parses_in_order() {
        let p = parse(GOOD, &all_known).unwrap();
        assert_eq!(p.name.as_str(), "shop");
        let names: Vec<Vec<&str>> =
            p.steps.iter().map(|s| s.vms.iter().map(VmName::as_str).collect()).collect();
        assert_eq!(names, [vec!["db01"], vec!["app01", "web01"]]);
        assert_eq!(p.steps[0].manual.as_deref(), Some("Check replication lag on db01"));
        let t = &p.targets[&VmName::new("db01").unwrap()];
        assert_eq!((t.alternate, t.sync), (false, SyncMode::Before));
    }

    #[test]
    fn every_mistake_names_its_line() {
        let cases: [(&str, &str, usize, &str); 7] = [
            ("twice", "[[group]]\nvms = [\"app01\", \"db01\"]\n", 0, "already in group 2"),
            ("unknown key", "[[group]]\nvms = [\"x1\"]\nprefix = []\n", 0, "unknown field"),
            ("bad name", "[[group]]\nvms = [\"a/b\"]\n", 0, "may only hold"),
            ("no vms", "[[group]]\nvms = []\n", 0, "names no VM"),
            (
                "location",
                "[vm.web01]\nmaster_target = \"m\"\nlocation = \"far\"\ntarget_disks = [\"a=b\"]\n",
                0,
                "original or alternate",
            ),
            ("syntax", "[[group]\nvms = []\n", 0, ""),
            ("unknown vm", "[[group]]\nvms = [\"ghost\"]\n", 0, "not protected"),
        ];
        for (what, extra, _, want) in cases {
            let text = format!("{GOOD}{extra}");
            let extra_first = GOOD.lines().count() + 1;
            let known =
                |vm: &VmName| (vm.as_str() == "ghost").then(|| "VM ghost is not protected here".to_string());
            let e = parse(&text, &known).unwrap_err();
            assert!(e.line >= extra_first, "{what}: {e} (the mistake is on line {extra_first} or after)");
            assert!(e.message.contains(want), "{what}: {e}");
        }
        let e = parse("name = \"s\"\n", &all_known).unwrap_err();
        assert!(e.message.contains("at least one [[group]]"), "{e}");
        let e = parse("name = \"a b\"\n[[group]]\nvms = [\"x\"]\n", &all_known).unwrap_err();
        assert_eq!(e.line, 1, "{e}");
    }
}
