//! A run's verdict from its consoles. The console client must have seen every
//! numbered line exactly once; plain stdout, which cannot be exactly-once across a
//! host's death, must lose nothing, and may repeat only what the primary released
//! just before it died (see README.md).

/// What each side printed, and what the console client received.
pub struct Consoles<'a> {
    pub primary: &'a str,
    pub standby: &'a str,
    pub client: &'a str,
    /// Where the client saw the console end, or why it did not.
    pub client_end: &'a Result<u64, String>,
}

/// The numbers of the lines of `text` that start with `prefix` (`tick 12 ...`), in order.
pub(crate) fn numbers(text: &str, prefix: &str) -> Vec<u32> {
    text.lines().filter_map(|l| l.strip_prefix(prefix)?.split_whitespace().next()?.parse().ok()).collect()
}

fn describe(seen: &[u32]) -> String {
    let repeats = seen.windows(2).filter(|w| w[1] <= w[0]).count();
    let gaps = seen.windows(2).filter(|w| w[1] > w[0] + 1).count();
    format!("{} numbered lines, {repeats} repeated, {gaps} gaps, first {:?}, last {:?}", seen.len(), seen.first(), seen.last())
}

pub fn check(prefix: &str, lines: u32, c: &Consoles, standby_exit: Option<i32>, primary_exit: Option<i32>) -> Result<String, String> {
    if primary_exit == Some(0) {
        return Err("the primary was not killed: it ran to the end".into());
    }
    let want: Vec<u32> = (1..=lines).collect();
    let seen = numbers(c.client, prefix);
    if seen != want {
        return Err(format!("the console client saw {}", describe(&seen)));
    }
    if let Err(e) = c.client_end {
        return Err(format!("the console client did not see the console end: {e}"));
    }
    if c.client.contains("check=BAD") || c.client.contains("TANDEM-CLOCK-BACKWARDS") {
        return Err("the guest found its memory or clock wrong".into());
    }
    if standby_exit != Some(0) || !c.standby.contains("TANDEM-GUEST-DONE rc=0") {
        return Err(format!("the standby's guest did not finish cleanly (exit {standby_exit:?})"));
    }
    // The client's bytes are the whole console. The primary's stdout must be where it
    // begins and the standby's where it ends, with nothing between them missing.
    if !c.client.starts_with(c.primary) {
        return Err("the primary's stdout is not the start of the console the client saw".into());
    }
    let Some(from) = c.client.len().checked_sub(c.standby.len()).filter(|&f| c.client[f..] == *c.standby) else {
        return Err("the standby's stdout is not the end of the console the client saw".into());
    };
    if from > c.primary.len() {
        return Err(format!("stdout lost bytes {}..{from} of the console at the takeover", c.primary.len()));
    }
    let repeated = &c.client[from..c.primary.len()];
    let from_primary = numbers(c.primary, prefix).len();
    Ok(format!(
        "lines 1-{from_primary} from the primary, the rest from the standby; the client saw each once; \
         stdout repeated {} bytes ({} lines) at the takeover",
        repeated.len(),
        repeated.matches('\n').count()
    ))
}

/// The primary's output lag over a run, from its `released` events: p50 and p99 of the
/// time from an epoch's seal to the release of its output, in ms, and how many.
pub fn lag_percentiles(primary_events: &[serde_json::Value]) -> Option<(f64, f64, usize)> {
    let mut lags: Vec<f64> = primary_events.iter().filter(|e| e["event"] == "released").filter_map(|e| e["lag_ms"].as_f64()).collect();
    if lags.is_empty() {
        return None;
    }
    lags.sort_by(f64::total_cmp);
    let at = |p: f64| lags[((lags.len() - 1) as f64 * p).round() as usize];
    Some((at(0.5), at(0.99), lags.len()))
}

/// [`lag_percentiles`] as a drill prints it.
pub fn output_lag(primary_events: &[serde_json::Value]) -> Option<String> {
    let (p50, p99, n) = lag_percentiles(primary_events)?;
    Some(format!("output lag p50 {p50:.0} ms, p99 {p99:.0} ms over {n} releases"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const WHOLE: &str = "boot\ntick 1\ntick 2\ntick 3\nTANDEM-GUEST-DONE rc=0\n";

    fn judge(primary: &str, standby: &str, client: &str) -> Result<String, String> {
        let end = Ok(client.len() as u64);
        check("tick ", 3, &Consoles { primary, standby, client, client_end: &end }, Some(0), None)
    }

    #[test]
    fn stdout_may_repeat_at_the_takeover_but_never_lose() {
        // The primary died in the middle of line 2; the standby printed again from line 1.
        let ok = judge("boot\ntick 1\ntic", "tick 1\ntick 2\ntick 3\nTANDEM-GUEST-DONE rc=0\n", WHOLE).unwrap();
        assert!(ok.contains("repeated 10 bytes (1 lines)"), "{ok}");
        assert!(judge("boot\ntick 1\n", "tick 3\nTANDEM-GUEST-DONE rc=0\n", WHOLE).unwrap_err().contains("lost"));
        let twice = "boot\ntick 1\ntick 1\ntick 2\ntick 3\nTANDEM-GUEST-DONE rc=0\n";
        assert!(judge("boot\n", "tick 1\ntick 2\ntick 3\nTANDEM-GUEST-DONE rc=0\n", twice).unwrap_err().contains("1 repeated"));
    }

    #[test]
    fn the_output_lag_is_read_from_the_release_events() {
        let events: Vec<_> = (1..=100).map(|i| json!({"event": "released", "lag_ms": i as f64})).collect();
        assert_eq!(output_lag(&events).unwrap(), "output lag p50 51 ms, p99 99 ms over 100 releases");
        assert_eq!(output_lag(&[json!({"event": "protected"})]), None);
    }
}
