//! The generation number, kept in a file so that a promotion outlives the process: a
//! restarted standby that took over once still refuses the primary it replaced.

use std::io::Write;
use std::path::{Path, PathBuf};

const FILE: &str = "generation";

#[derive(Debug, thiserror::Error)]
pub enum GenerationError {
    #[error("cannot use state directory {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path} does not hold a generation number (a positive integer): {text:?}")]
    Corrupt { path: PathBuf, text: String },
}

/// The generation recorded in `dir`, 1 when none is yet.
pub fn read(dir: &Path) -> Result<u64, GenerationError> {
    let path = dir.join(FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => match text.trim().parse::<u64>() {
            Ok(g) if g > 0 => Ok(g),
            _ => Err(GenerationError::Corrupt { path, text: text.chars().take(40).collect() }),
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(1),
        Err(source) => Err(GenerationError::Io { path, source }),
    }
}

/// Records `generation` in `dir` durably: written aside, synced, renamed into place.
pub fn write(dir: &Path, generation: u64) -> Result<(), GenerationError> {
    let io = |source| GenerationError::Io { path: dir.to_path_buf(), source };
    std::fs::create_dir_all(dir).map_err(io)?;
    let tmp = dir.join(format!("{FILE}.tmp"));
    let mut f = std::fs::File::create(&tmp).map_err(io)?;
    writeln!(f, "{generation}").map_err(io)?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, dir.join(FILE)).map_err(io)?;
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_written_generation_reads_back_and_garbage_is_refused() {
        let dir = std::env::temp_dir().join(format!("tandem-gen-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(read(&dir).unwrap(), 1);
        write(&dir, 7).unwrap();
        assert_eq!(read(&dir).unwrap(), 7);
        std::fs::write(dir.join(FILE), "seven").unwrap();
        assert!(read(&dir).unwrap_err().to_string().contains("generation number"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
