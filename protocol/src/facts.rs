//! Compatibility before restore (issue 13): the facts a restore depends on, recorded with
//! every checkpoint ([`ImageFacts`], part of the signed record) and reported by every CTS
//! about its resource ([`ResourceFacts`], with its registration), and the rules that compare
//! them ([`judge`]), which a site relaxes with [`Rules`] (`[compatibility]` in the GCS's and
//! the CTS's configuration).
//!
//! The rules are CRIU's own requirements for a system-level image (an image of another
//! checkpointer records its facts but is judged only by what its type declares):
//! - the **architecture** must be the same (CRIU restores machine code and registers as
//!   dumped); not relaxable;
//! - the **kernel** must be as new as the one the image was taken on (the image's vDSO, its
//!   system calls and `/proc` formats come from that kernel); relaxable (`kernel`);
//! - the **CRIU version** must have the same major and minor number (image formats and
//!   restore features change between minor versions); relaxable (`criu_version`);
//! - the **CPU** must have the features the image's `cpuinfo.img` (`criu cpuinfo dump`)
//!   names: `criu cpuinfo check` on the target decides; the GCS, which runs no CRIU, only
//!   knows whether the two resources' `cpuinfo.img` are byte-identical; relaxable (`cpu`);
//! - the **executable, mapped files and open files** must exist on the target, the mapped
//!   ones with the same digest (CRIU maps them again by path): checked on the target only
//!   (`gca-recover`, through its CTS, before anything is fetched); relaxable per path
//!   pattern (`ignore_missing`) and for digests (`mapped_files`).

use serde::{Deserialize, Serialize};
use sha2::Digest;

use crate::messages::{list, push, push_list, push_opt, push_texts, texts, Property, XmlContent};
use crate::ns::GCA;
use crate::xml::{Element, XmlError};

/// The most mapped and open files (and declared properties) a record's facts may name: a
/// CTS records at most this many, the GCS refuses more.
pub const MAX_FILES: usize = 4096;

/// The driver kind whose images the system-level rules apply to.
pub const CRIU: &str = "criu";

/// A file a restore needs: its path and, for a mapped file, the SHA-256 of its content
/// (`sha256:<hex>`; none for a file too large to hash or unreadable).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct FileFact {
    pub path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
}

impl XmlContent for FileFact {
    fn write_children(&self, el: &mut Element) {
        push(el, "Path", &self.path);
        push_opt(el, "Digest", &self.digest);
    }
    fn read_children(el: &Element) -> Result<Self, XmlError> {
        Ok(Self {
            path: el.req_text(GCA, "Path")?,
            digest: el.opt_text(GCA, "Digest"),
        })
    }
}

/// What a computing resource offers a restore, as its CTS reports it when it registers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResourceFacts {
    /// `uname -m` (`x86_64`, `aarch64`).
    pub architecture: String,
    /// `uname -r` (`6.18.44-fc-v769`).
    pub kernel: String,
    /// The CRIU version the CTS's driver runs (`4.1.1`); none without CRIU.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub criu_version: Option<String>,
    /// `criu cpuinfo dump`'s `cpuinfo.img`, base64; none without CRIU.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpuinfo: Option<String>,
}

impl ResourceFacts {
    fn write_resource(&self, el: &mut Element) {
        push(el, "Architecture", &self.architecture);
        push(el, "Kernel", &self.kernel);
        push_opt(el, "CRIUVersion", &self.criu_version);
        push_opt(el, "CPUInfo", &self.cpuinfo);
    }
    fn read_resource(el: &Element) -> Result<Self, XmlError> {
        Ok(Self {
            architecture: el.req_text(GCA, "Architecture")?,
            kernel: el.req_text(GCA, "Kernel")?,
            criu_version: el.opt_text(GCA, "CRIUVersion"),
            cpuinfo: el.opt_text(GCA, "CPUInfo"),
        })
    }
}

/// The longest text of a resource's facts the GCS keeps (a `cpuinfo.img` is about 200 bytes
/// of base64; a release string a few dozen).
pub const MAX_FACT_BYTES: usize = 16 * 1024;

impl ResourceFacts {
    /// Refuses facts with a value longer than [`MAX_FACT_BYTES`] or an empty architecture or
    /// kernel.
    pub fn check_bounds(&self) -> Result<(), String> {
        if self.architecture.trim().is_empty() || self.kernel.trim().is_empty() {
            return Err("a resource's facts name its architecture and kernel".into());
        }
        for (what, v) in [
            ("Architecture", Some(&self.architecture)),
            ("Kernel", Some(&self.kernel)),
            ("CRIUVersion", self.criu_version.as_ref()),
            ("CPUInfo", self.cpuinfo.as_ref()),
        ] {
            if v.is_some_and(|v| v.len() > MAX_FACT_BYTES) {
                return Err(format!(
                    "the facts' {what} is longer than {MAX_FACT_BYTES} bytes"
                ));
            }
        }
        Ok(())
    }
}

impl XmlContent for ResourceFacts {
    fn write_children(&self, el: &mut Element) {
        self.write_resource(el)
    }
    fn read_children(el: &Element) -> Result<Self, XmlError> {
        Self::read_resource(el)
    }
}

/// What a checkpoint's restore depends on, recorded when it was taken.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageFacts {
    /// The resource the image was taken on.
    #[serde(flatten)]
    pub resource: ResourceFacts,
    /// The driver that took it (`criu`, `application`, `command`, `vmm`).
    pub checkpointer: String,
    /// The job's executable (its root process's `/proc/PID/exe`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub executable: Option<FileFact>,
    /// The files mapped into the job's processes (libraries, mapped data), sorted by path.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mapped_files: Vec<FileFact>,
    /// The regular files the job's processes had open, sorted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub open_files: Vec<String>,
    /// For a type that is not system-level: what the type declares (its core service's
    /// functional properties).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub declared: Vec<Property>,
}

impl XmlContent for ImageFacts {
    fn write_children(&self, el: &mut Element) {
        self.resource.write_resource(el);
        push(el, "Checkpointer", &self.checkpointer);
        if let Some(e) = &self.executable {
            el.push_child(e.to_element("Executable"));
        }
        push_list(el, "MappedFile", &self.mapped_files);
        push_texts(el, "OpenFile", &self.open_files);
        push_list(el, "Declared", &self.declared);
    }
    fn read_children(el: &Element) -> Result<Self, XmlError> {
        Ok(Self {
            resource: ResourceFacts::read_resource(el)?,
            checkpointer: el.req_text(GCA, "Checkpointer")?,
            executable: crate::messages::opt_child(el, "Executable")?,
            mapped_files: list(el, "MappedFile")?,
            open_files: texts(el, "OpenFile"),
            declared: list(el, "Declared")?,
        })
    }
}

impl ImageFacts {
    /// `sha256:<hex>` of the facts' JSON form, which the image signature covers
    /// ([`crate::signature`]). The JSON of these types is canonical: struct fields in
    /// declaration order, lists as recorded, no maps.
    pub fn digest(&self) -> String {
        let json = serde_json::to_vec(self).unwrap_or_default();
        format!("sha256:{}", hex::encode(sha2::Sha256::digest(&json)))
    }

    /// Refuses facts beyond [`MAX_FILES`] files or with paths that are not absolute.
    pub fn check_bounds(&self) -> Result<(), String> {
        self.resource.check_bounds()?;
        let n = self.mapped_files.len() + self.open_files.len() + self.declared.len();
        if n > MAX_FILES {
            return Err(format!(
                "the checkpoint's facts name {n} files and properties, more than {MAX_FILES}"
            ));
        }
        match self.needed_paths().find(|(p, _, _)| !p.starts_with('/')) {
            Some((p, _, what)) => Err(format!(
                "the checkpoint's facts name a {what} by a relative path: {p:?}"
            )),
            None => Ok(()),
        }
    }

    /// Every path a restore needs on the target: the executable, the mapped files, the open
    /// files.
    pub fn needed_paths(&self) -> impl Iterator<Item = (&str, Option<&str>, &'static str)> {
        self.executable
            .iter()
            .map(|f| (f.path.as_str(), f.digest.as_deref(), "executable"))
            .chain(
                self.mapped_files
                    .iter()
                    .map(|f| (f.path.as_str(), f.digest.as_deref(), "mapped file")),
            )
            .chain(
                self.open_files
                    .iter()
                    .map(|p| (p.as_str(), None, "file the job had open")),
            )
    }
}

// ---------------------------------------------------------------------------------------------
// Verdicts

/// Whether a candidate can restore an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    /// Every rule checked holds (some may be left to the target: see the notes).
    Compatible,
    /// Facts are missing (an older CTS or record): nothing could be checked.
    Unknown,
    /// A rule does not hold: the reasons say which.
    Incompatible,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Compatible => "compatible",
            Verdict::Unknown => "unknown",
            Verdict::Incompatible => "incompatible",
        }
    }
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Verdict {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "compatible" => Ok(Verdict::Compatible),
            "unknown" => Ok(Verdict::Unknown),
            "incompatible" => Ok(Verdict::Incompatible),
            _ => Err(format!(
                "unknown verdict {s:?} (compatible, unknown, incompatible)"
            )),
        }
    }
}

/// A candidate's verdict on one image: why not (`reasons`), and what else is worth knowing
/// (`notes`: rules a site relaxed, checks left to the target).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Compatibility {
    pub verdict: Verdict,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reasons: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

impl Compatibility {
    pub fn is_compatible(&self) -> bool {
        self.verdict == Verdict::Compatible
    }

    /// The reasons as one sentence.
    pub fn summary(&self) -> String {
        if self.reasons.is_empty() {
            self.verdict.to_string()
        } else {
            self.reasons.join("; ")
        }
    }

    /// Marks the verdict incompatible, for `why`.
    pub fn refuse(&mut self, why: String) {
        self.verdict = Verdict::Incompatible;
        self.reasons.push(why);
    }
}

impl XmlContent for Compatibility {
    fn write_children(&self, el: &mut Element) {
        push(el, "Verdict", self.verdict);
        push_texts(el, "Reason", &self.reasons);
        push_texts(el, "Note", &self.notes);
    }
    fn read_children(el: &Element) -> Result<Self, XmlError> {
        Ok(Self {
            verdict: el
                .opt_parse(GCA, "Verdict")?
                .ok_or_else(|| el.error("<Compatibility> has no <Verdict>"))?,
            reasons: texts(el, "Reason"),
            notes: texts(el, "Note"),
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Rules and their relaxation

/// How the target's kernel must relate to the image's.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum KernelRule {
    /// The target's kernel is the image's or newer (default).
    #[default]
    NewerOrEqual,
    /// The same release (`uname -r`).
    Same,
    /// Any kernel (CRIU itself then decides, after the image was fetched).
    Any,
}

/// How the target's CRIU version must relate to the image's.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CriuRule {
    /// The same version, patch level included.
    Exact,
    /// The same major and minor version (default).
    #[default]
    SameMinor,
    /// The same major version: another minor version is accepted.
    SameMajor,
    /// Any CRIU at all.
    Any,
}

/// Whether the CPU check runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CpuRule {
    /// `criu cpuinfo check` against the image's `cpuinfo.img` (default).
    #[default]
    Check,
    /// Not checked.
    Ignore,
}

/// What the target must have of the image's mapped files.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MappedRule {
    /// Present, with the recorded digest (default).
    #[default]
    SameDigest,
    /// Present.
    Present,
}

macro_rules! from_str_by_serde {
    ($t:ty, $what:literal) => {
        impl std::str::FromStr for $t {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                serde_json::from_value(serde_json::Value::String(s.trim().to_string()))
                    .map_err(|_| format!(concat!("unknown ", $what, " rule {:?}"), s))
            }
        }
    };
}
from_str_by_serde!(KernelRule, "kernel");
from_str_by_serde!(CriuRule, "CRIU version");
from_str_by_serde!(CpuRule, "CPU");
from_str_by_serde!(MappedRule, "mapped-file");

/// A site's compatibility rules (`[compatibility]`; defaults are the strict rules above).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Rules {
    /// `newer-or-equal` (default), `same`, `any`.
    pub kernel: KernelRule,
    /// `same-minor` (default), `exact`, `same-major`, `any`.
    pub criu_version: CriuRule,
    /// `check` (default), `ignore`.
    pub cpu: CpuRule,
    /// `same-digest` (default), `present`.
    pub mapped_files: MappedRule,
    /// Path patterns (`*` any characters, `?` one) of files whose absence on the target is
    /// accepted (the job copes, or the site restores them itself).
    pub ignore_missing: Vec<String>,
}

impl Rules {
    /// Reads `{PREFIX}COMPATIBILITY_KERNEL`, `..._CRIU_VERSION`, `..._CPU`,
    /// `..._MAPPED_FILES`, `..._IGNORE_MISSING` (patterns separated by `:`).
    pub fn apply_env(
        &mut self,
        prefix: &str,
        var: &impl Fn(&str) -> Option<String>,
    ) -> Result<(), String> {
        let key = |k: &str| format!("{prefix}COMPATIBILITY_{k}");
        let bad = |k: &str, e: String| format!("environment variable {}: {e}", key(k));
        if let Some(v) = var(&key("KERNEL")) {
            self.kernel = v.parse().map_err(|e| bad("KERNEL", e))?;
        }
        if let Some(v) = var(&key("CRIU_VERSION")) {
            self.criu_version = v.parse().map_err(|e| bad("CRIU_VERSION", e))?;
        }
        if let Some(v) = var(&key("CPU")) {
            self.cpu = v.parse().map_err(|e| bad("CPU", e))?;
        }
        if let Some(v) = var(&key("MAPPED_FILES")) {
            self.mapped_files = v.parse().map_err(|e| bad("MAPPED_FILES", e))?;
        }
        if let Some(v) = var(&key("IGNORE_MISSING")) {
            self.ignore_missing = v
                .split(':')
                .filter(|p| !p.is_empty())
                .map(str::to_string)
                .collect();
        }
        Ok(())
    }

    /// The `ignore_missing` pattern `path` matches, if any.
    pub fn ignored(&self, path: &str) -> Option<&str> {
        self.ignore_missing
            .iter()
            .find(|p| glob_match(p.as_bytes(), path.as_bytes()))
            .map(String::as_str)
    }
}

/// `*` (any run of characters, `/` included) and `?` (one character); everything else is
/// literal.
pub fn glob_match(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        if p < pattern.len() && (pattern[p] == b'?' || pattern[p] == text[t]) {
            p += 1;
            t += 1;
        } else if p < pattern.len() && pattern[p] == b'*' {
            star = Some((p, t));
            p += 1;
        } else if let Some((sp, st)) = star {
            p = sp + 1;
            t = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

/// The leading numbers of a version or kernel release (`6.18.44-fc` → `[6, 18, 44]`).
pub fn version_numbers(v: &str) -> Vec<u64> {
    v.trim()
        .split(|c: char| !c.is_ascii_digit())
        .take_while(|s| !s.is_empty())
        .map_while(|s| s.parse().ok())
        .collect()
}

/// The rules the GCS can check from facts alone: architecture, kernel, CRIU version, and
/// the CPU as far as byte-identical `cpuinfo.img`s go. What needs the target (files,
/// digests, `criu cpuinfo check`) is named in the notes, for the target's CTS to check.
pub fn judge(
    image: Option<&ImageFacts>,
    target: Option<&ResourceFacts>,
    rules: &Rules,
) -> Compatibility {
    let mut c = Compatibility {
        verdict: Verdict::Compatible,
        reasons: Vec::new(),
        notes: Vec::new(),
    };
    let (Some(image), Some(target)) = (image, target) else {
        c.verdict = Verdict::Unknown;
        c.reasons.push(match image {
            None => "the checkpoint records no facts about its resource (taken by an older CTS)"
                .to_string(),
            Some(_) => "the CTS reports no facts about its resource (an older CTS)".to_string(),
        });
        return c;
    };
    if image.checkpointer != CRIU {
        c.notes.push(format!(
            "an image of the {} driver: the system-level rules do not apply (what its type declares is recorded, and every candidate is of its type)",
            image.checkpointer
        ));
        return c;
    }
    let from = &image.resource;
    if from.architecture != target.architecture {
        c.refuse(format!(
            "architecture {} differs from {}, the image's (CRIU restores machine code as dumped)",
            target.architecture, from.architecture
        ));
    }
    let (have, want) = (
        version_numbers(&target.kernel),
        version_numbers(&from.kernel),
    );
    match rules.kernel {
        KernelRule::NewerOrEqual if have < want => c.refuse(format!(
            "kernel {} < {} needed by the image's vDSO and system calls (taken on {})",
            target.kernel, from.kernel, from.kernel
        )),
        KernelRule::Same if target.kernel != from.kernel => c.refuse(format!(
            "kernel {} is not {}, the image's (compatibility.kernel = same)",
            target.kernel, from.kernel
        )),
        KernelRule::Any if have < want => c.notes.push(format!(
            "kernel {} is older than the image's {}: accepted (compatibility.kernel = any)",
            target.kernel, from.kernel
        )),
        _ => {}
    }
    match (&from.criu_version, &target.criu_version) {
        (_, None) => c.refuse("no CRIU on the resource; the image is CRIU's".to_string()),
        (None, Some(_)) => c
            .notes
            .push("the image records no CRIU version".to_string()),
        (Some(from_v), Some(to_v)) => {
            let (a, b) = (version_numbers(from_v), version_numbers(to_v));
            let n = |v: &[u64], i: usize| v.get(i).copied().unwrap_or(0);
            let same = |k: usize| (0..k).all(|i| n(&a, i) == n(&b, i));
            let ok = match rules.criu_version {
                CriuRule::Exact => from_v == to_v,
                CriuRule::SameMinor => same(2),
                CriuRule::SameMajor => same(1),
                CriuRule::Any => true,
            };
            if !ok {
                let rule = match rules.criu_version {
                    CriuRule::Exact => "the same version",
                    CriuRule::SameMinor => "the same major and minor version",
                    CriuRule::SameMajor => "the same major version",
                    CriuRule::Any => "any version",
                };
                c.refuse(format!(
                    "CRIU {to_v} differs from {from_v}, which took the image ({rule} is needed; compatibility.criu_version relaxes it)"
                ));
            } else if from_v != to_v {
                c.notes
                    .push(format!("CRIU {to_v} restores an image of CRIU {from_v}"));
            }
        }
    }
    match rules.cpu {
        CpuRule::Ignore => c
            .notes
            .push("CPU features not checked (compatibility.cpu = ignore)".to_string()),
        CpuRule::Check => match (&from.cpuinfo, &target.cpuinfo) {
            (Some(a), Some(b)) if a == b => {}
            (Some(_), _) => c.notes.push(
                "CPU features: checked on the resource with criu cpuinfo check before the image is fetched"
                    .to_string(),
            ),
            (None, _) => c.notes.push("the image records no CPU features".to_string()),
        },
    }
    if image.needed_paths().next().is_some() {
        c.notes.push(
            "files (executable, mapped, open): checked on the resource before the image is fetched"
                .to_string(),
        );
    }
    c
}

/// Orders candidates by verdict (compatible, unknown, incompatible), keeping the order within
/// each.
pub fn order_by_verdict<T>(items: &mut [T], verdict: impl Fn(&T) -> Verdict) {
    items.sort_by_key(|i| verdict(i));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resource(kernel: &str, criu: &str) -> ResourceFacts {
        ResourceFacts {
            architecture: "x86_64".into(),
            kernel: kernel.into(),
            criu_version: Some(criu.into()),
            cpuinfo: Some("AAAA".into()),
        }
    }

    fn image() -> ImageFacts {
        ImageFacts {
            resource: resource("6.18.44-fc", "4.1.1"),
            checkpointer: CRIU.into(),
            executable: Some(FileFact {
                path: "/usr/bin/bash".into(),
                digest: Some("sha256:00".into()),
            }),
            mapped_files: vec![FileFact {
                path: "/usr/lib/libc.so.6".into(),
                digest: None,
            }],
            open_files: vec!["/data/in.dat".into()],
            declared: vec![],
        }
    }

    #[test]
    fn facts_round_trip_through_xml_and_json_with_one_digest() {
        let f = image();
        let el = f.to_element("Facts");
        let back = ImageFacts::read_children(&crate::xml::parse(&el.to_xml()).unwrap()).unwrap();
        assert_eq!(back, f);
        assert_eq!(back.digest(), f.digest());
        let json: ImageFacts = serde_json::from_value(serde_json::to_value(&f).unwrap()).unwrap();
        assert_eq!(json.digest(), f.digest());
        let mut other = f.clone();
        other.open_files.clear();
        assert_ne!(other.digest(), f.digest());
    }

    #[test]
    fn the_default_rules_refuse_an_older_kernel_another_arch_and_another_criu_minor() {
        let rules = Rules::default();
        let f = image();
        let same = judge(Some(&f), Some(&resource("6.18.44-fc", "4.1.1")), &rules);
        assert_eq!(same.verdict, Verdict::Compatible, "{same:?}");
        assert!(judge(Some(&f), Some(&resource("6.19.0", "4.1.0")), &rules).is_compatible());
        let old = judge(Some(&f), Some(&resource("6.1.0", "4.1.1")), &rules);
        assert_eq!(old.verdict, Verdict::Incompatible);
        assert!(
            old.reasons[0].contains("kernel 6.1.0 < 6.18.44-fc"),
            "{old:?}"
        );
        let criu = judge(Some(&f), Some(&resource("6.18.44-fc", "4.2.0")), &rules);
        assert!(
            criu.reasons[0].contains("CRIU 4.2.0 differs from 4.1.1"),
            "{criu:?}"
        );
        let mut arm = resource("6.18.44-fc", "4.1.1");
        arm.architecture = "aarch64".into();
        assert!(judge(Some(&f), Some(&arm), &rules).reasons[0].contains("architecture"));
        let mut no_criu = resource("6.18.44-fc", "4.1.1");
        no_criu.criu_version = None;
        assert!(!judge(Some(&f), Some(&no_criu), &rules).is_compatible());
        assert_eq!(judge(None, Some(&arm), &rules).verdict, Verdict::Unknown);
    }

    #[test]
    fn a_site_relaxes_the_kernel_and_criu_rules_but_never_the_architecture() {
        let f = image();
        let relaxed = Rules {
            kernel: KernelRule::Any,
            criu_version: CriuRule::SameMajor,
            ..Rules::default()
        };
        let c = judge(Some(&f), Some(&resource("6.1.0", "4.2.0")), &relaxed);
        assert!(c.is_compatible(), "{c:?}");
        assert!(c
            .notes
            .iter()
            .any(|n| n.contains("compatibility.kernel = any")));
        let mut arm = resource("6.18.44-fc", "4.1.1");
        arm.architecture = "aarch64".into();
        let all = Rules {
            kernel: KernelRule::Any,
            criu_version: CriuRule::Any,
            cpu: CpuRule::Ignore,
            ..Rules::default()
        };
        assert!(!judge(Some(&f), Some(&arm), &all).is_compatible());
    }

    #[test]
    fn rules_come_from_the_environment_and_patterns_match() {
        let mut r = Rules::default();
        let env = |k: &str| match k {
            "GCS_COMPATIBILITY_CRIU_VERSION" => Some("same-major".to_string()),
            "GCS_COMPATIBILITY_IGNORE_MISSING" => Some("/tmp/*:/data/*.log".to_string()),
            _ => None,
        };
        r.apply_env("GCS_", &env).unwrap();
        assert_eq!(r.criu_version, CriuRule::SameMajor);
        assert_eq!(r.ignored("/tmp/x/y"), Some("/tmp/*"));
        assert_eq!(r.ignored("/data/a.log"), Some("/data/*.log"));
        assert_eq!(r.ignored("/data/in.dat"), None);
        let bad = |k: &str| (k == "X_COMPATIBILITY_KERNEL").then(|| "older".to_string());
        assert!(Rules::default().apply_env("X_", &bad).is_err());
        assert!(glob_match(b"a?c", b"abc") && !glob_match(b"a?c", b"ac"));
    }

    #[test]
    fn facts_beyond_their_bounds_are_refused() {
        assert!(image().check_bounds().is_ok());
        let mut f = image();
        f.open_files = vec!["/x".into(); MAX_FILES + 1];
        assert!(f.check_bounds().is_err());
        let mut f = image();
        f.open_files = vec!["relative/path".into()];
        assert!(f.check_bounds().unwrap_err().contains("relative path"));
        let mut r = resource("6.1", "4.1");
        r.cpuinfo = Some("A".repeat(MAX_FACT_BYTES + 1));
        assert!(r.check_bounds().is_err());
    }

    #[test]
    fn verdicts_order_compatible_first() {
        let mut v = vec![
            Verdict::Incompatible,
            Verdict::Compatible,
            Verdict::Unknown,
            Verdict::Compatible,
        ];
        order_by_verdict(&mut v, |v| *v);
        assert_eq!(
            v,
            [
                Verdict::Compatible,
                Verdict::Compatible,
                Verdict::Unknown,
                Verdict::Incompatible
            ]
        );
    }
}
