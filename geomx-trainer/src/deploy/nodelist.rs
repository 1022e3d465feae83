//! Slurm's compressed host lists (`SLURM_JOB_NODELIST`, `SLURM_STEP_NODELIST`, …), expanded.
//!
//! Grammar: comma-separated items; commas inside brackets do not separate items. An item is
//! literal text with any number of bracket groups, `prefix[ranges]suffix[ranges]…`; a group is a
//! comma-separated list of numbers `7` or ranges `01-04`. A range's numbers are zero-padded to the
//! width of its lower bound as written (`[08-11]` → `08 09 10 11`, `[8-11]` → `8 9 10 11`,
//! `[098-101]` → `098 … 101`). Several groups in one item expand as a product, the leftmost group
//! varying slowest (`r[1-2]n[1-2]` → `r1n1 r1n2 r2n1 r2n2`). Hosts keep the order of the list.

use super::DeployError;

/// Most hosts one list may expand to (a guard against a malformed or hostile variable).
pub const MAX_HOSTS: usize = 1 << 20;

/// Expands `list` (the value of variable `var`, named in errors) into host names, in order.
pub fn expand(var: &str, list: &str) -> Result<Vec<String>, DeployError> {
    let err = |m: String| DeployError::env(var, format!("{list:?}: {m}"));
    let list = list.trim();
    if list.is_empty() {
        return Err(err("empty host list".into()));
    }
    let mut hosts = Vec::new();
    for item in split_top_level(list).map_err(err)? {
        if item.is_empty() {
            return Err(err("empty item between commas".into()));
        }
        let parts = parse_item(item).map_err(err)?;
        let mut expanded = vec![String::new()];
        for part in parts {
            match part {
                Part::Text(t) => expanded.iter_mut().for_each(|h| h.push_str(t)),
                Part::Group(numbers) => {
                    if expanded.len().saturating_mul(numbers.len()) > MAX_HOSTS {
                        return Err(err(format!("expands to more than {MAX_HOSTS} hosts")));
                    }
                    expanded = expanded
                        .iter()
                        .flat_map(|h| numbers.iter().map(move |n| format!("{h}{n}")))
                        .collect();
                }
            }
        }
        if hosts.len() + expanded.len() > MAX_HOSTS {
            return Err(err(format!("expands to more than {MAX_HOSTS} hosts")));
        }
        hosts.extend(expanded);
    }
    Ok(hosts)
}

/// The first host of `list` without expanding the rest.
pub fn first(var: &str, list: &str) -> Result<String, DeployError> {
    let list = list.trim();
    let head = split_top_level(list)
        .map_err(|m| DeployError::env(var, format!("{list:?}: {m}")))?
        .first()
        .copied()
        .unwrap_or("");
    let mut hosts = expand(var, head)?;
    Ok(hosts.swap_remove(0))
}

enum Part<'a> {
    Text(&'a str),
    Group(Vec<String>),
}

/// Splits at commas outside brackets; checks that brackets are balanced and not nested.
fn split_top_level(list: &str) -> Result<Vec<&str>, String> {
    let mut items = Vec::new();
    let (mut depth, mut start) = (0usize, 0usize);
    for (i, c) in list.char_indices() {
        match c {
            '[' if depth == 0 => depth = 1,
            '[' => return Err(format!("nested '[' at byte {i}")),
            ']' if depth == 1 => depth = 0,
            ']' => return Err(format!("']' without '[' at byte {i}")),
            ',' if depth == 0 => {
                items.push(list[start..i].trim());
                start = i + 1;
            }
            _ => {}
        }
    }
    if depth != 0 {
        return Err("'[' without ']'".into());
    }
    items.push(list[start..].trim());
    Ok(items)
}

fn parse_item(item: &str) -> Result<Vec<Part<'_>>, String> {
    let mut parts = Vec::new();
    let mut rest = item;
    while let Some(open) = rest.find('[') {
        if open > 0 {
            parts.push(Part::Text(&rest[..open]));
        }
        let close = rest[open..]
            .find(']')
            .map(|c| open + c)
            .ok_or("'[' without ']'")?;
        parts.push(Part::Group(parse_group(&rest[open + 1..close])?));
        rest = &rest[close + 1..];
    }
    if !rest.is_empty() {
        parts.push(Part::Text(rest));
    }
    if let Some(Part::Text(t)) = parts.first() {
        if t.chars().any(char::is_whitespace) {
            return Err(format!("whitespace in host name {t:?}"));
        }
    }
    Ok(parts)
}

fn parse_group(group: &str) -> Result<Vec<String>, String> {
    if group.trim().is_empty() {
        return Err("empty brackets".into());
    }
    let mut out = Vec::new();
    for range in group.split(',') {
        let range = range.trim();
        let (lo, hi) = range.split_once('-').unwrap_or((range, range));
        let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        if !digits(lo) || !digits(hi) {
            return Err(format!(
                "{range:?} in brackets is not a number or a range N-M"
            ));
        }
        let too_long = |s: &str| format!("{s:?} has too many digits");
        let a: u64 = lo.parse().map_err(|_| too_long(lo))?;
        let b: u64 = hi.parse().map_err(|_| too_long(hi))?;
        if a > b {
            return Err(format!("range {range:?} runs backwards"));
        }
        if (b - a) as usize >= MAX_HOSTS || out.len() + (b - a) as usize >= MAX_HOSTS {
            return Err(format!("range {range:?} has more than {MAX_HOSTS} hosts"));
        }
        let width = lo.len();
        out.extend((a..=b).map(|n| format!("{n:0width$}")));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn x(list: &str) -> Vec<String> {
        expand("SLURM_JOB_NODELIST", list).unwrap_or_else(|e| panic!("{list}: {e}"))
    }

    #[test]
    fn real_forms_expand_in_order() {
        assert_eq!(x("vm"), ["vm"]);
        assert_eq!(
            x("node[01-04,07]"),
            ["node01", "node02", "node03", "node04", "node07"]
        );
        assert_eq!(x("a[1-2]-ib,b3"), ["a1-ib", "a2-ib", "b3"]);
        assert_eq!(x("n[9-11]"), ["n9", "n10", "n11"]);
        // Zero padding follows the lower bound, also across a digit boundary.
        assert_eq!(x("gpu[08-11]"), ["gpu08", "gpu09", "gpu10", "gpu11"]);
        assert_eq!(x("c[098-101]"), ["c098", "c099", "c100", "c101"]);
        // Nested zero-padding: two groups with their own widths, leftmost slowest.
        assert_eq!(
            x("rack[01-02]-node[001-002]"),
            [
                "rack01-node001",
                "rack01-node002",
                "rack02-node001",
                "rack02-node002"
            ]
        );
        // Mixed widths inside one group, a plain host after a bracketed one, dots in names.
        assert_eq!(
            x("cn[1,03,005-006],login1.cluster"),
            ["cn1", "cn03", "cn005", "cn006", "login1.cluster"]
        );
        assert_eq!(x("[1-2]x"), ["1x", "2x"]);
        assert_eq!(
            x("dgx-a100-[001-002],dgx-h100-07"),
            ["dgx-a100-001", "dgx-a100-002", "dgx-h100-07"]
        );
    }

    #[test]
    fn heterogeneous_components_have_one_list_each() {
        // As Slurm 22.05 sets them in a step over all components of a heterogeneous job
        // (`srun --het-group=0-2`): one list per component, and their union.
        assert_eq!(x("n0"), ["n0"]);
        assert_eq!(x("n[1-2]"), ["n1", "n2"]);
        assert_eq!(x("n[0-2]"), ["n0", "n1", "n2"]);
        assert_eq!(
            first("SLURM_JOB_NODELIST_HET_GROUP_1", "gpu[07-09],cpu1").unwrap(),
            "gpu07"
        );
    }

    #[test]
    fn first_host_without_expanding_the_rest() {
        assert_eq!(first("V", "node[01-04,07]").unwrap(), "node01");
        assert_eq!(first("V", "a[1-2]-ib,b3").unwrap(), "a1-ib");
        assert_eq!(first("V", "b3,a[1-2]").unwrap(), "b3");
        // The rest is not expanded, but must still be well-formed.
        assert!(first("V", "b3,a[1-").is_err());
    }

    #[test]
    fn malformed_lists_name_the_variable() {
        for bad in [
            "",
            "node[",
            "node]",
            "node[]",
            "node[1-]",
            "node[a-b]",
            "node[4-1]",
            "node[[1]]",
            "a,,b",
            "node[1-99999999999999999999]",
            "x[0-9999999]",
        ] {
            let e = expand("SLURM_STEP_NODELIST", bad).unwrap_err().to_string();
            assert!(e.starts_with("SLURM_STEP_NODELIST: "), "{bad:?}: {e}");
        }
    }

    #[test]
    fn products_are_bounded() {
        let e = expand("V", "a[0-2047]b[0-1023]").unwrap_err();
        assert!(e.to_string().contains("more than"), "{e}");
    }
}
