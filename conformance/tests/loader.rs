//! The loader refuses damaged checkpoints with an error naming the tensor or field at fault.
//! Each test writes a damaged copy of a bundled fixture into a temporary directory.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use gemma4_conformance::fixtures;
use gemma4_model::{CpuBackend, LoadError, Model};
use safetensors::tensor::{Dtype, TensorView};

/// A tensor of the copy: dtype, shape, bytes.
type Tensors = BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)>;

fn source() -> PathBuf {
    fixtures()
        .into_iter()
        .find(|d| d.ends_with("tiny-31b-recipe"))
        .unwrap_or_else(|| fixtures()[0].clone())
}

fn read_tensors(dir: &Path) -> Tensors {
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.iter()
        .map(|(n, v)| {
            (
                n.to_string(),
                (v.dtype(), v.shape().to_vec(), v.data().to_vec()),
            )
        })
        .collect()
}

/// A temporary directory removed when dropped.
struct Scratch(PathBuf);

impl std::ops::Deref for Scratch {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Copies the fixture's JSON files into a fresh temp dir and writes `tensors` as model.safetensors.
fn damaged_copy(tag: &str, tensors: &Tensors) -> Scratch {
    let src = source();
    let dir = std::env::temp_dir().join(format!("gemma4-loader-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for f in [
        "config.json",
        "hf_quant_config.json",
        "generation_config.json",
    ] {
        if src.join(f).exists() {
            std::fs::copy(src.join(f), dir.join(f)).unwrap();
        }
    }
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|(n, (d, s, b))| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
    Scratch(dir)
}

fn load_err(dir: &Path) -> LoadError {
    let err = Model::<CpuBackend>::load(dir, &Default::default())
        .expect_err("damaged checkpoint must be refused");
    println!("refused as expected: {err}");
    err
}

fn first_ending(t: &Tensors, suffix: &str) -> String {
    t.keys()
        .find(|k| k.ends_with(suffix))
        .unwrap_or_else(|| panic!("no tensor ending in {suffix}"))
        .clone()
}

#[test]
fn intact_copy_loads() {
    let dir = damaged_copy("intact", &read_tensors(&source()));
    Model::<CpuBackend>::load(&dir, &Default::default()).expect("an undamaged copy loads");
}

#[test]
fn truncated_file() {
    let dir = damaged_copy("truncated", &read_tensors(&source()));
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 100]).unwrap();
    let err = load_err(&dir);
    assert!(matches!(err, LoadError::Safetensors { .. }), "{err}");
    assert!(err.to_string().contains("model.safetensors"), "{err}");
}

#[test]
fn garbage_header() {
    let dir = damaged_copy("garbage", &read_tensors(&source()));
    std::fs::write(
        dir.join("model.safetensors"),
        b"\xff\xff\xff\xff\xff\xff\xff\x7fnot a header",
    )
    .unwrap();
    assert!(matches!(load_err(&dir), LoadError::Safetensors { .. }));
}

#[test]
fn missing_tensor() {
    let mut t = read_tensors(&source());
    let name = first_ending(&t, "self_attn.k_norm.weight");
    t.remove(&name);
    let err = load_err(&damaged_copy("missing", &t));
    assert!(
        matches!(&err, LoadError::MissingTensor { name: n } if *n == name),
        "{err}"
    );
}

#[test]
fn missing_layer_scalar() {
    let mut t = read_tensors(&source());
    let name = first_ending(&t, "layer_scalar");
    t.remove(&name);
    let err = load_err(&damaged_copy("scalar", &t));
    assert!(err.to_string().contains(&name), "{err}");
}

#[test]
fn wrong_dtype_of_block_scale() {
    let mut t = read_tensors(&source());
    let name = first_ending(&t, ".weight_scale");
    t.get_mut(&name).unwrap().0 = Dtype::U8;
    let err = load_err(&damaged_copy("dtype-scale", &t));
    assert!(
        matches!(&err, LoadError::Dtype { name: n, .. } if *n == name),
        "{err}"
    );
}

#[test]
fn nan_block_scale() {
    let mut t = read_tensors(&source());
    let name = first_ending(&t, ".weight_scale");
    t.get_mut(&name).unwrap().2[3] = 0x7f;
    let err = load_err(&damaged_copy("nan-scale", &t));
    assert!(
        matches!(&err, LoadError::BadValue { name: n, .. } if *n == name),
        "{err}"
    );
}

#[test]
fn wrong_dtype_of_norm() {
    let mut t = read_tensors(&source());
    let name = first_ending(&t, "input_layernorm.weight");
    let (_, shape, bytes) = t.remove(&name).unwrap();
    // Same byte count, integer dtype.
    let n: usize = shape.iter().product();
    t.insert(name.clone(), (Dtype::I16, shape, bytes[..2 * n].to_vec()));
    let err = load_err(&damaged_copy("dtype-norm", &t));
    assert!(
        matches!(&err, LoadError::Dtype { name: n, .. } if *n == name),
        "{err}"
    );
}

#[test]
fn wrong_shape() {
    let mut t = read_tensors(&source());
    let name = first_ending(&t, "mlp.down_proj.weight");
    let entry = t.get_mut(&name).unwrap();
    // Drop the last row.
    let row_bytes = entry.2.len() / entry.1[0];
    entry.1[0] -= 1;
    entry.2.truncate(entry.2.len() - row_bytes);
    let err = load_err(&damaged_copy("shape", &t));
    assert!(
        matches!(&err, LoadError::Shape { name: n, .. } if *n == name),
        "{err}"
    );
}

#[test]
fn unused_tensor() {
    let mut t = read_tensors(&source());
    let extra = "model.language_model.layers.0.mystery.weight".to_string();
    t.insert(extra.clone(), (Dtype::BF16, vec![4], vec![0; 8]));
    let err = load_err(&damaged_copy("unused", &t));
    assert!(
        matches!(&err, LoadError::Unused { names } if names.contains(&extra)),
        "{err}"
    );
}

#[test]
fn unsupported_config_feature() {
    let dir = damaged_copy("ple", &read_tensors(&source()));
    let path = dir.join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    cfg["text_config"]["hidden_size_per_layer_input"] = serde_json::json!(256);
    std::fs::write(&path, cfg.to_string()).unwrap();
    let err = load_err(&dir);
    assert!(
        matches!(err, LoadError::Unsupported { .. })
            && err.to_string().contains("hidden_size_per_layer_input"),
        "{err}"
    );
}

#[test]
fn missing_config() {
    let dir = damaged_copy("noconfig", &read_tensors(&source()));
    std::fs::remove_file(dir.join("config.json")).unwrap();
    let err = load_err(&dir);
    assert!(err.to_string().contains("config.json"), "{err}");
}

#[test]
fn sharded_checkpoint_loads() {
    // Split the fixture in two shards with an index, as large checkpoints are shipped.
    let t = read_tensors(&source());
    let dir = damaged_copy("sharded", &t);
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    let names: Vec<&String> = t.keys().collect();
    let half = names.len() / 2;
    let mut weight_map = serde_json::Map::new();
    for (i, chunk) in [&names[..half], &names[half..]].iter().enumerate() {
        let file = format!("model-0000{}-of-00002.safetensors", i + 1);
        let views: Vec<(String, TensorView)> = chunk
            .iter()
            .map(|n| {
                let (d, s, b) = &t[*n];
                ((*n).clone(), TensorView::new(*d, s.clone(), b).unwrap())
            })
            .collect();
        safetensors::serialize_to_file(views, None, &dir.join(&file)).unwrap();
        for n in chunk.iter() {
            weight_map.insert((*n).clone(), serde_json::Value::String(file.clone()));
        }
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    let sharded = Model::<CpuBackend>::load(&dir, &Default::default()).expect("sharded copy loads");
    assert_eq!(sharded.report.tensors_used, t.len());
}
