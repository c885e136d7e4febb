//! The generation number, kept in a file so that a promotion outlives the process: a
//! restarted standby that took over once still refuses the primary it replaced.

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

/// Records `generation` in `dir` durably (see [`crate::durable::write`]).
pub fn write(dir: &Path, generation: u64) -> Result<(), GenerationError> {
    crate::durable::write(dir, FILE, format!("{generation}\n").as_bytes())
        .map_err(|source| GenerationError::Io { path: dir.to_path_buf(), source })
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
