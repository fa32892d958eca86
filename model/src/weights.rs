//! Memory-mapped safetensors checkpoint (one file, or shards listed in
//! `model.safetensors.index.json`), with a record of which tensors the model consumed: a tensor
//! left unused at the end is an error, as is a missing one (no silent skips).

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use burn::tensor::{DType, TensorData};
use memmap2::Mmap;
use safetensors::tensor::{Dtype, SafeTensors};

use crate::error::LoadError;

struct Entry {
    file: usize,
    dtype: Dtype,
    shape: Vec<usize>,
    /// Absolute byte range in the mapped file.
    start: usize,
    end: usize,
}

pub struct Checkpoint {
    files: Vec<(PathBuf, Mmap)>,
    entries: HashMap<String, Entry>,
    used: BTreeSet<String>,
    /// Bytes of the NVFP4 linears taken so far (codes and block scales, packed as they stay).
    pub nvfp4_bytes: usize,
    /// Called with (tensors taken, total) as the model takes tensors (a progress bar).
    progress: Option<Box<dyn FnMut(usize, usize) + Send>>,
}

/// A borrowed tensor: dtype, shape and raw little-endian bytes.
pub struct RawTensor<'a> {
    pub name: &'a str,
    pub dtype: Dtype,
    pub shape: &'a [usize],
    pub bytes: &'a [u8],
}

impl Checkpoint {
    pub fn open(dir: &Path) -> Result<Self, LoadError> {
        let index = dir.join("model.safetensors.index.json");
        let files: Vec<PathBuf> = if index.exists() {
            let v = crate::config::read_json(&index)?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| {
                    LoadError::config(
                        "model.safetensors.index.json weight_map",
                        "missing or not an object",
                    )
                })?;
            let names: BTreeSet<&str> = map.values().filter_map(|f| f.as_str()).collect();
            if names.len() != map.values().count() && map.values().any(|f| !f.is_string()) {
                return Err(LoadError::config(
                    "model.safetensors.index.json weight_map",
                    "file names must be strings",
                ));
            }
            names.into_iter().map(|n| dir.join(n)).collect()
        } else {
            vec![dir.join("model.safetensors")]
        };
        let mut ckpt = Checkpoint {
            files: vec![],
            entries: HashMap::new(),
            used: BTreeSet::new(),
            nvfp4_bytes: 0,
            progress: None,
        };
        for path in files {
            ckpt.add_file(path)?;
        }
        Ok(ckpt)
    }

    fn add_file(&mut self, path: PathBuf) -> Result<(), LoadError> {
        let file = std::fs::File::open(&path).map_err(|source| LoadError::Io {
            path: path.clone(),
            source,
        })?;
        // SAFETY: the file is opened read-only and is not modified while the engine runs; the
        // checkpoint directory is treated as immutable, as in every safetensors loader.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|source| LoadError::Io {
            path: path.clone(),
            source,
        })?;
        // `deserialize` checks the header, dtypes, and that every byte range fits the file
        // (a truncated file fails here).
        let st = SafeTensors::deserialize(&mmap).map_err(|e| LoadError::Safetensors {
            path: path.clone(),
            msg: e.to_string(),
        })?;
        let base = mmap.as_ptr() as usize;
        let idx = self.files.len();
        for (name, view) in st.iter() {
            let start = view.data().as_ptr() as usize - base;
            let entry = Entry {
                file: idx,
                dtype: view.dtype(),
                shape: view.shape().to_vec(),
                start,
                end: start + view.data().len(),
            };
            if let Some(prev) = self.entries.get(name) {
                return Err(LoadError::Duplicate {
                    name: name.to_string(),
                    first: self.files[prev.file].0.display().to_string(),
                    second: path.display().to_string(),
                });
            }
            self.entries.insert(name.to_string(), entry);
        }
        self.files.push((path, mmap));
        Ok(())
    }

    pub fn set_progress(&mut self, f: impl FnMut(usize, usize) + Send + 'static) {
        self.progress = Some(Box::new(f));
    }

    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    pub fn dtype(&self, name: &str) -> Option<Dtype> {
        self.entries.get(name).map(|e| e.dtype)
    }

    /// Takes a tensor (marks it used).
    pub fn raw(&mut self, name: &str) -> Result<RawTensor<'_>, LoadError> {
        let (key, e) =
            self.entries
                .get_key_value(name)
                .ok_or_else(|| LoadError::MissingTensor {
                    name: name.to_string(),
                })?;
        self.used.insert(key.clone());
        if let Some(p) = self.progress.as_mut() {
            p(self.used.len(), self.entries.len());
        }
        Ok(RawTensor {
            name: key,
            dtype: e.dtype,
            shape: &e.shape,
            bytes: &self.files[e.file].1[e.start..e.end],
        })
    }

    /// Marks a tensor as deliberately not used (e.g. `input_scale`, only for W4A4).
    pub fn skip(&mut self, name: &str) {
        if self.entries.contains_key(name) {
            self.used.insert(name.to_string());
        }
    }

    /// A float tensor (BF16, F16 or F32) of the given shape, as f32 values.
    pub fn float(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>, LoadError> {
        let t = self.raw(name)?;
        check_shape(&t, shape)?;
        to_f32(&t)
    }

    /// A float tensor (BF16, F16 or F32) of the given shape in its checkpoint dtype, unwidened:
    /// the backend converts it to its own float type on upload, so a bf16 weight stays two bytes
    /// on a half-precision backend (the f32 CPU backend widens it).
    pub fn float_data(&mut self, name: &str, shape: &[usize]) -> Result<TensorData, LoadError> {
        let t = self.raw(name)?;
        check_shape(&t, shape)?;
        let dtype = match t.dtype {
            Dtype::F32 => DType::F32,
            Dtype::BF16 => DType::BF16,
            Dtype::F16 => DType::F16,
            other => {
                return Err(LoadError::Dtype {
                    name: t.name.into(),
                    expected: "BF16, F16 or F32".into(),
                    found: dtype_name(other),
                })
            }
        };
        Ok(TensorData::from_bytes_vec(
            t.bytes.to_vec(),
            shape.to_vec(),
            dtype,
        ))
    }

    /// A scalar F32/BF16/F16 tensor of shape [] or [1].
    pub fn scalar(&mut self, name: &str) -> Result<f32, LoadError> {
        let t = self.raw(name)?;
        if t.shape.iter().product::<usize>() != 1 {
            return Err(LoadError::Shape {
                name: name.into(),
                expected: vec![],
                found: t.shape.to_vec(),
            });
        }
        Ok(to_f32(&t)?[0])
    }

    /// Error if any tensor was not consumed by the model.
    pub fn finish(&self) -> Result<(), LoadError> {
        let mut unused: Vec<&str> = self
            .entries
            .keys()
            .filter(|k| !self.used.contains(*k))
            .map(String::as_str)
            .collect();
        if unused.is_empty() {
            return Ok(());
        }
        unused.sort_unstable();
        let total = unused.len();
        let mut names = unused
            .iter()
            .take(8)
            .map(|s| format!("`{s}`"))
            .collect::<Vec<_>>()
            .join(", ");
        if total > 8 {
            names.push_str(&format!(" and {} more", total - 8));
        }
        Err(LoadError::Unused { names })
    }

    pub fn used_count(&self) -> usize {
        self.used.len()
    }
}

pub fn check_shape(t: &RawTensor, shape: &[usize]) -> Result<(), LoadError> {
    if t.shape != shape {
        return Err(LoadError::Shape {
            name: t.name.into(),
            expected: shape.to_vec(),
            found: t.shape.to_vec(),
        });
    }
    Ok(())
}

pub fn dtype_name(d: Dtype) -> String {
    format!("{d:?}")
}

fn to_f32(t: &RawTensor) -> Result<Vec<f32>, LoadError> {
    let b = t.bytes;
    Ok(match t.dtype {
        Dtype::F32 => b
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::BF16 => b
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::F16 => b
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        other => {
            return Err(LoadError::Dtype {
                name: t.name.into(),
                expected: "BF16, F16 or F32".into(),
                found: dtype_name(other),
            })
        }
    })
}
