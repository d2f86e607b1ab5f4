//! Sharded training checkpoints: under ZeRO each rank writes its own part of the state, so no rank
//! ever holds the whole optimizer state (or, under ZeRO-3, the whole model) to save it.
//!
//! `rank-R-of-N.safetensors` holds the rank's pieces of the flat buffer, concatenated:
//! `exp_avg` and `exp_avg_sq` always, `params` under ZeRO-3; its metadata lists the pieces as
//! `[[start, end], ...]`. Under ZeRO-1 and 2 every rank has the full parameters, and rank 0 also
//! writes them as a Hugging Face model, so such a checkpoint still loads in `transformers`.

use std::collections::HashMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;

use crate::{Error, Result};

const PIECES: &str = "pieces";

pub fn shard_name(rank: usize, world: usize) -> String {
    format!("rank-{rank:05}-of-{world:05}.safetensors")
}

/// The rank shard files of a checkpoint directory, in rank order.
pub fn shard_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("rank-")))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Writes one rank's pieces (`params` only under ZeRO-3).
pub fn write_rank_shard(path: &Path, pieces: &[Range<usize>], params: Option<&[f32]>, m: &[f32], v: &[f32]) -> Result<()> {
    let total: usize = pieces.iter().map(|p| p.len()).sum();
    let mut tensors = Vec::new();
    if let Some(p) = params {
        tensors.push(("params", p));
    }
    tensors.push(("exp_avg", m));
    tensors.push(("exp_avg_sq", v));
    let views: Vec<(String, TensorView<'_>)> = tensors
        .into_iter()
        .map(|(k, d)| {
            debug_assert_eq!(d.len(), total);
            (k.to_string(), TensorView::new(Dtype::F32, vec![d.len()], bytemuck::cast_slice(d)).expect("length matches"))
        })
        .collect();
    let ranges: Vec<[usize; 2]> = pieces.iter().map(|p| [p.start, p.end]).collect();
    let mut meta = HashMap::new();
    meta.insert(PIECES.to_string(), serde_json::to_string(&ranges).expect("serialises"));
    super::hf::write_safetensors(views, meta, path)?;
    std::fs::File::open(path).and_then(|f| f.sync_all()).map_err(|e| Error::io(path, e))
}

/// Full buffers assembled from the rank shards of a checkpoint.
pub struct Assembled {
    /// The parameters, when the shards hold them (ZeRO-3).
    pub params: Option<Vec<f32>>,
    pub m: Vec<f32>,
    pub v: Vec<f32>,
}

/// The full buffers assembled from every rank shard of `dir`.
pub fn read_rank_shards(dir: &Path, len: usize) -> Result<Assembled> {
    let files = shard_files(dir);
    if files.is_empty() {
        return Err(Error::Weights { path: dir.into(), message: "no rank shards".into() });
    }
    let mut params: Option<Vec<f32>> = None;
    let (mut m, mut v) = (vec![0.0f32; len], vec![0.0f32; len]);
    let mut covered = 0usize;
    for path in &files {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let bad = |message: String| Error::Weights { path: path.clone(), message };
        let (_, meta) = SafeTensors::read_metadata(&bytes).map_err(|e| bad(e.to_string()))?;
        let ranges: Vec<[usize; 2]> = meta
            .metadata()
            .as_ref()
            .and_then(|m| m.get(PIECES))
            .and_then(|p| serde_json::from_str(p).ok())
            .ok_or_else(|| bad("no piece list in the shard's metadata".into()))?;
        if ranges.iter().any(|[a, b]| a > b || *b > len) {
            return Err(bad(format!("pieces outside a buffer of {len}")));
        }
        let st = SafeTensors::deserialize(&bytes).map_err(|e| bad(e.to_string()))?;
        let total: usize = ranges.iter().map(|[a, b]| b - a).sum();
        let fill = |key: &str, out: &mut [f32]| -> Result<()> {
            let t = st.tensor(key).map_err(|e| bad(format!("{key}: {e}")))?;
            if t.dtype() != Dtype::F32 || t.shape() != [total] {
                return Err(bad(format!("{key} is {:?} {:?}, expected F32 [{total}]", t.dtype(), t.shape())));
            }
            let mut at = 0;
            for [a, b] in &ranges {
                for (o, c) in out[*a..*b].iter_mut().zip(t.data()[at * 4..(at + b - a) * 4].chunks_exact(4)) {
                    *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                }
                at += b - a;
            }
            Ok(())
        };
        fill("exp_avg", &mut m)?;
        fill("exp_avg_sq", &mut v)?;
        if st.names().contains(&"params") {
            let p = params.get_or_insert_with(|| vec![0.0; len]);
            fill("params", p)?;
        }
        covered += total;
    }
    if covered != len {
        return Err(Error::Weights { path: dir.into(), message: format!("the rank shards cover {covered} of {len} elements") });
    }
    Ok(Assembled { params, m, v })
}
