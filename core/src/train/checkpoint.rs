//! Checkpoints: everything needed to continue a run bit-identically (parameters, optimiser
//! moments, best-so-far weights, early-stopping counters, history), written atomically after
//! every epoch. Layout: `ADVCKPT1`, a little-endian u64 header length, a JSON header, then the
//! f32 tensors (little endian) in the order the header lists their lengths.

use std::io::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::optim::Optimizer;

const MAGIC: &[u8; 8] = b"ADVCKPT1";

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("checkpoint {path}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("checkpoint {path}: {msg}")]
    Format { path: String, msg: String },
    #[error("checkpoint {path} does not match this run: {msg}")]
    Mismatch { path: String, msg: String },
}

/// One epoch's numbers.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct EpochStats {
    pub epoch: usize,
    pub lr: f32,
    pub train_loss: f64,
    pub train_accuracy: f64,
    pub val_loss: Option<f64>,
    pub val_accuracy: Option<f64>,
    pub seconds: f64,
}

/// The resumable state of a run.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainState {
    /// The next epoch to run (0-based).
    pub next_epoch: usize,
    pub params: Vec<Vec<f32>>,
    pub opt: Optimizer,
    /// (epoch, metric, weights) of the best validation result so far.
    pub best: Option<(usize, f64, Vec<Vec<f32>>)>,
    pub since_best: usize,
    pub stopped_early: bool,
    pub history: Vec<EpochStats>,
}

#[derive(Serialize, Deserialize)]
struct Header {
    /// Identifies the run's config (a checkpoint of another config is refused).
    fingerprint: String,
    next_epoch: usize,
    opt_kind: super::optim::OptimizerKind,
    weight_decay: f32,
    t: u64,
    best_epoch: Option<usize>,
    best_metric: Option<f64>,
    since_best: usize,
    stopped_early: bool,
    history: Vec<EpochStats>,
    /// Lengths of params, then best params (if any), then m, then v.
    params: Vec<usize>,
    best: Vec<usize>,
    m: Vec<usize>,
    v: Vec<usize>,
}

pub fn save(path: &Path, fingerprint: &str, s: &TrainState) -> Result<(), CheckpointError> {
    let lens = |v: &[Vec<f32>]| v.iter().map(Vec::len).collect::<Vec<_>>();
    let h = Header {
        fingerprint: fingerprint.to_string(),
        next_epoch: s.next_epoch,
        opt_kind: s.opt.kind,
        weight_decay: s.opt.weight_decay,
        t: s.opt.t,
        best_epoch: s.best.as_ref().map(|b| b.0),
        best_metric: s.best.as_ref().map(|b| b.1),
        since_best: s.since_best,
        stopped_early: s.stopped_early,
        history: s.history.clone(),
        params: lens(&s.params),
        best: s.best.as_ref().map_or(vec![], |b| lens(&b.2)),
        m: lens(&s.opt.m),
        v: lens(&s.opt.v),
    };
    let hj = serde_json::to_vec(&h).map_err(|e| CheckpointError::Format {
        path: path.display().to_string(),
        msg: e.to_string(),
    })?;
    let mut bytes = Vec::new();
    bytes.extend_from_slice(MAGIC);
    bytes.extend_from_slice(&(hj.len() as u64).to_le_bytes());
    bytes.extend_from_slice(&hj);
    let empty = Vec::new();
    let best = s.best.as_ref().map_or(&empty, |b| &b.2);
    for t in s.params.iter().chain(best).chain(&s.opt.m).chain(&s.opt.v) {
        for v in t {
            bytes.extend_from_slice(&v.to_le_bytes());
        }
    }
    let io = |source| CheckpointError::Io {
        path: path.display().to_string(),
        source,
    };
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp).map_err(io)?;
    f.write_all(&bytes).map_err(io)?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

pub fn load(path: &Path, fingerprint: &str) -> Result<TrainState, CheckpointError> {
    let p = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|source| CheckpointError::Io {
        path: p.clone(),
        source,
    })?;
    let fmt = |msg: &str| CheckpointError::Format {
        path: p.clone(),
        msg: msg.to_string(),
    };
    if bytes.len() < 16 || &bytes[..8] != MAGIC {
        return Err(fmt("not an adverse checkpoint"));
    }
    let hl = u64::from_le_bytes(bytes[8..16].try_into().map_err(|_| fmt("short header"))?) as usize;
    let hend = 16usize
        .checked_add(hl)
        .filter(|&e| e <= bytes.len())
        .ok_or_else(|| fmt("truncated header"))?;
    let h: Header = serde_json::from_slice(&bytes[16..hend]).map_err(|e| fmt(&e.to_string()))?;
    if h.fingerprint != fingerprint {
        return Err(CheckpointError::Mismatch {
            path: p,
            msg: "it was written by a run with a different model, data or optimiser config".into(),
        });
    }
    let mut off = hend;
    let mut take = |lens: &[usize]| -> Result<Vec<Vec<f32>>, CheckpointError> {
        let mut out = Vec::with_capacity(lens.len());
        for &n in lens {
            let end = n
                .checked_mul(4)
                .and_then(|b| off.checked_add(b))
                .filter(|&e| e <= bytes.len())
                .ok_or_else(|| fmt("truncated tensor data"))?;
            out.push(
                bytes[off..end]
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
            );
            off = end;
        }
        Ok(out)
    };
    let params = take(&h.params)?;
    let best_w = take(&h.best)?;
    let m = take(&h.m)?;
    let v = take(&h.v)?;
    if off != bytes.len() {
        return Err(fmt("trailing bytes"));
    }
    let best = match (h.best_epoch, h.best_metric) {
        (Some(e), Some(mv)) => Some((e, mv, best_w)),
        _ => None,
    };
    Ok(TrainState {
        next_epoch: h.next_epoch,
        params,
        opt: Optimizer {
            kind: h.opt_kind,
            weight_decay: h.weight_decay,
            t: h.t,
            m,
            v,
        },
        best,
        since_best: h.since_best,
        stopped_early: h.stopped_early,
        history: h.history,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::optim::OptimizerKind;

    #[test]
    fn round_trips_and_refuses_other_runs_and_garbage() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.ckpt");
        let mut opt = Optimizer::new(
            OptimizerKind::Adam {
                beta1: 0.9,
                beta2: 0.99,
                eps: 1e-8,
            },
            0.01,
            &[2, 1],
        );
        opt.t = 5;
        opt.m[0] = vec![0.5, -0.25];
        let s = TrainState {
            next_epoch: 3,
            params: vec![vec![1.0, f32::MIN_POSITIVE], vec![-3.5]],
            opt,
            best: Some((1, 0.25, vec![vec![2.0, 2.5], vec![0.0]])),
            since_best: 1,
            stopped_early: false,
            history: vec![EpochStats {
                epoch: 0,
                lr: 0.1,
                train_loss: 0.5,
                train_accuracy: 0.75,
                val_loss: Some(0.4),
                val_accuracy: None,
                seconds: 1.0,
            }],
        };
        save(&path, "fp", &s).unwrap();
        assert_eq!(load(&path, "fp").unwrap(), s);
        assert!(matches!(
            load(&path, "other"),
            Err(CheckpointError::Mismatch { .. })
        ));
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 3]).unwrap();
        assert!(matches!(
            load(&path, "fp"),
            Err(CheckpointError::Format { .. })
        ));
        std::fs::write(&path, b"hello").unwrap();
        assert!(matches!(
            load(&path, "fp"),
            Err(CheckpointError::Format { .. })
        ));
    }
}
