//! Small files that must outlive a crash: the generation, the witness's record.

use std::io::Write;
use std::path::Path;

/// Writes `bytes` to `dir/name` durably: to a file aside, synced, renamed into place,
/// the directory synced. A crash leaves the old content or the new, never a torn one.
pub fn write(dir: &Path, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!("{name}.tmp"));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, dir.join(name))?;
    std::fs::File::open(dir).and_then(|d| d.sync_all())
}
