//! Memory this process may still use, and what it uses now: what the model's memory plan
//! ([`super::dpir::MemoryPlan`]) is checked against before anything large is allocated, so that
//! a configuration that cannot fit stops with an error instead of the OOM killer or an
//! allocation failure (which aborts a Rust process, and the application hosting the element).
//!
//! The budget is the smallest of: `MemAvailable` (`/proc/meminfo`); the cgroup v2 limit of this
//! process's cgroup and its parents, less their usage; the address-space limit (`ulimit -v`)
//! less this process's address space; and `DPIR_MEMORY_LIMIT` (bytes, or with a K/M/G suffix:
//! a cap on this process's resident memory, for tests and for sharing a machine) less its
//! resident memory. Linux only; elsewhere every figure is unknown and nothing is refused.

use std::fmt;

/// Bytes this process may still allocate, and which limit says so.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Budget {
    pub bytes: u64,
    /// The binding limit, in words (e.g. `MemAvailable`, `DPIR_MEMORY_LIMIT=4G`).
    pub limited_by: String,
}

impl fmt::Display for Budget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (limited by {})", gib(self.bytes), self.limited_by)
    }
}

/// `12.3 GiB`.
pub fn gib(bytes: u64) -> String {
    let g = bytes as f64 / (1u64 << 30) as f64;
    if g >= 10.0 { format!("{g:.1} GiB") } else { format!("{g:.2} GiB") }
}

/// `4G`, `512M`, `100000K`, `1.5G` or plain bytes.
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, mult) = match s.chars().last()?.to_ascii_uppercase() {
        'K' => (&s[..s.len() - 1], 1u64 << 10),
        'M' => (&s[..s.len() - 1], 1 << 20),
        'G' => (&s[..s.len() - 1], 1 << 30),
        'T' => (&s[..s.len() - 1], 1 << 40),
        _ => (s, 1),
    };
    let v: f64 = num.trim().parse().ok()?;
    (v >= 0.0).then_some((v * mult as f64) as u64)
}

/// A `/proc/self/status` field in bytes (`VmRSS`, `VmHWM`, `VmSize`).
fn status_field(name: &str) -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with(name) && l[name.len()..].starts_with(':'))?;
    let kb: u64 = line[name.len() + 1..].trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kb * 1024)
}

/// Resident memory of this process now.
pub fn rss() -> u64 {
    status_field("VmRSS").unwrap_or(0)
}

/// Peak resident memory since the process started, or since [`reset_peak`].
pub fn peak_rss() -> u64 {
    status_field("VmHWM").unwrap_or(0)
}

/// Restart [`peak_rss`] from the current resident memory (Linux `clear_refs` 5), so that one
/// stage's peak can be measured; a no-op where the kernel refuses.
pub fn reset_peak() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

fn mem_available() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = s.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line["MemAvailable:".len()..].trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kb * 1024)
}

/// The tightest cgroup v2 `memory.max − memory.current` from this process's cgroup up.
fn cgroup_room() -> Option<(u64, String)> {
    let cg = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let path = cg.lines().find_map(|l| l.strip_prefix("0::"))?.trim().to_string();
    let mut dir = std::path::PathBuf::from("/sys/fs/cgroup").join(path.trim_start_matches('/'));
    let mut best: Option<(u64, String)> = None;
    loop {
        let max = std::fs::read_to_string(dir.join("memory.max")).ok();
        let cur = std::fs::read_to_string(dir.join("memory.current")).ok();
        if let (Some(max), Some(cur)) = (max, cur)
            && let (Ok(max), Ok(cur)) = (max.trim().parse::<u64>(), cur.trim().parse::<u64>())
        {
            let room = max.saturating_sub(cur);
            if best.as_ref().is_none_or(|(b, _)| room < *b) {
                best = Some((room, format!("the cgroup limit of {} ({})", gib(max), dir.display())));
            }
        }
        if !dir.pop() || dir.as_os_str() == "/sys/fs" {
            break;
        }
    }
    best
}

/// The soft `ulimit -v` less this process's address space.
fn address_space_room() -> Option<(u64, String)> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max address space"))?;
    let soft = line["Max address space".len()..].split_whitespace().next()?;
    let limit: u64 = soft.parse().ok()?; // "unlimited" does not parse
    let used = status_field("VmSize")?;
    Some((limit.saturating_sub(used), format!("the address-space limit (ulimit -v) of {}", gib(limit))))
}

/// What this process may still allocate (see the module notes); `None` where nothing is known.
pub fn budget() -> Option<Budget> {
    let mut best: Option<(u64, String)> = mem_available().map(|b| (b, "MemAvailable".to_string()));
    let mut consider = |c: Option<(u64, String)>| {
        if let Some((b, why)) = c
            && best.as_ref().is_none_or(|(x, _)| b < *x)
        {
            best = Some((b, why));
        }
    };
    consider(cgroup_room());
    consider(address_space_room());
    if let Some(v) = std::env::var_os("DPIR_MEMORY_LIMIT") {
        let v = v.to_string_lossy().to_string();
        if let Some(limit) = parse_size(&v) {
            consider(Some((limit.saturating_sub(rss()), format!("DPIR_MEMORY_LIMIT={v}"))));
        }
    }
    best.map(|(bytes, limited_by)| Budget { bytes, limited_by })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_and_without_suffixes() {
        assert_eq!(parse_size("4G"), Some(4 << 30));
        assert_eq!(parse_size("512m"), Some(512 << 20));
        assert_eq!(parse_size("1.5G"), Some(3 << 29));
        assert_eq!(parse_size("1000"), Some(1000));
        assert_eq!(parse_size("lots"), None);
        assert_eq!(parse_size("-1G"), None);
    }

    #[test]
    fn this_process_has_a_budget_and_a_resident_size() {
        let b = budget().expect("Linux reports MemAvailable");
        assert!(b.bytes > 0, "{b}");
        assert!(rss() > 0 && peak_rss() >= rss());
    }
}
