//! Training data: images already in model-input units plus integer labels, loaded from a NumPy
//! `.npz` archive (`<split>_images`, `<split>_labels`, the MedMNIST layout) or from a folder of
//! DICOM files listed in a labels CSV.
//!
//! Integer images are divided by their type's maximum (255 for 8-bit), which is the model-card
//! convention "model input = stored value / 255" the demo models are trained and attacked under;
//! float images are taken as they are. Every inconsistency (counts, shapes, label range, empty
//! sets) is a typed error naming the file and the array, never a panic.

use std::path::{Path, PathBuf};

use crate::dicom::{DecodeLimits, DicomFile};

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("cannot read {path}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: no array `{name}` (arrays present: {present})")]
    MissingArray {
        path: String,
        name: String,
        present: String,
    },
    #[error("{path}: array `{name}` has dtype {dtype}, expected {want}")]
    Dtype {
        path: String,
        name: String,
        dtype: String,
        want: &'static str,
    },
    #[error("{path}: array `{name}` has shape {shape:?}, expected {want}")]
    Shape {
        path: String,
        name: String,
        shape: Vec<u64>,
        want: String,
    },
    #[error("{path}: {images} images but {labels} labels")]
    CountMismatch {
        path: String,
        images: usize,
        labels: usize,
    },
    #[error("{path}: the data set is empty")]
    Empty { path: String },
    #[error("{path}: label {label} of sample {index} is out of range for {classes} classes")]
    LabelRange {
        path: String,
        index: usize,
        label: i64,
        classes: usize,
    },
    #[error("{path}: images are {got:?} (C, H, W) but the model takes {want:?}")]
    ImageShape {
        path: String,
        got: [usize; 3],
        want: [usize; 3],
    },
    #[error("{path}:{line}: {msg}")]
    Csv {
        path: String,
        line: usize,
        msg: String,
    },
    #[error("{path}: {msg}")]
    Dicom { path: String, msg: String },
}

/// A labelled image set in model-input units, NCHW, row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct Dataset {
    /// `len() * c * h * w` values.
    pub images: Vec<f32>,
    pub labels: Vec<u32>,
    /// [C, H, W] of one image.
    pub chw: [usize; 3],
    /// Where it came from, for errors and the model card.
    pub origin: String,
}

impl Dataset {
    pub fn len(&self) -> usize {
        self.labels.len()
    }
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
    pub fn image_len(&self) -> usize {
        self.chw.iter().product()
    }
    /// Copy the images at `idx` into one batch buffer.
    pub fn gather(&self, idx: &[usize]) -> (Vec<f32>, Vec<u32>) {
        let il = self.image_len();
        let mut x = Vec::with_capacity(idx.len() * il);
        let mut y = Vec::with_capacity(idx.len());
        for &i in idx {
            x.extend_from_slice(&self.images[i * il..(i + 1) * il]);
            y.push(self.labels[i]);
        }
        (x, y)
    }
    /// The first `n` samples (all when `n` exceeds the size).
    pub fn truncate(mut self, n: usize) -> Self {
        let n = n.min(self.len());
        self.images.truncate(n * self.image_len());
        self.labels.truncate(n);
        self
    }

    /// Check the set against the model it is going to train: non-empty, image shape equal to
    /// the model input, every label below `classes`.
    pub fn validate(&self, want_chw: [usize; 3], classes: usize) -> Result<(), DataError> {
        if self.is_empty() {
            return Err(DataError::Empty {
                path: self.origin.clone(),
            });
        }
        if self.chw != want_chw {
            return Err(DataError::ImageShape {
                path: self.origin.clone(),
                got: self.chw,
                want: want_chw,
            });
        }
        if let Some((index, &l)) = self
            .labels
            .iter()
            .enumerate()
            .find(|(_, l)| **l as usize >= classes)
        {
            return Err(DataError::LabelRange {
                path: self.origin.clone(),
                index,
                label: l as i64,
                classes,
            });
        }
        Ok(())
    }
}

/// One array read from an npz: its shape and values widened to f64 (exact for every integer
/// type a label or 8/16-bit image uses), plus the scale that maps its type to [0, 1].
struct Array {
    shape: Vec<u64>,
    values: Vec<f64>,
    /// Integer arrays: the type's maximum; floats: None.
    int_max: Option<f64>,
}

fn read_array<R: std::io::Read + std::io::Seek>(
    npz: &mut npyz::npz::NpzArchive<R>,
    path: &str,
    name: &str,
) -> Result<Array, DataError> {
    use npyz::{DType, TypeChar};
    let io = |source| DataError::Io {
        path: path.to_string(),
        source,
    };
    let present: Vec<String> = npz.array_names().map(str::to_string).collect();
    let file = npz
        .by_name(name)
        .map_err(io)?
        .ok_or_else(|| DataError::MissingArray {
            path: path.to_string(),
            name: name.to_string(),
            present: present.join(", "),
        })?;
    let shape = file.shape().to_vec();
    let dtype = file.dtype();
    let bad = |dtype: &DType| DataError::Dtype {
        path: path.to_string(),
        name: name.to_string(),
        dtype: dtype.descr(),
        want: "an integer or float array",
    };
    let DType::Plain(ts) = &dtype else {
        return Err(bad(&dtype));
    };
    let conv = |r: std::io::Result<Vec<f64>>| r.map_err(io);
    let (values, int_max) = match (ts.type_char(), ts.size_field()) {
        (TypeChar::Uint, 1) => (
            conv(
                file.into_vec::<u8>()
                    .map(|v| v.into_iter().map(f64::from).collect()),
            )?,
            Some(u8::MAX as f64),
        ),
        (TypeChar::Uint, 2) => (
            conv(
                file.into_vec::<u16>()
                    .map(|v| v.into_iter().map(f64::from).collect()),
            )?,
            Some(u16::MAX as f64),
        ),
        (TypeChar::Uint, 4) => (
            conv(
                file.into_vec::<u32>()
                    .map(|v| v.into_iter().map(f64::from).collect()),
            )?,
            Some(u32::MAX as f64),
        ),
        (TypeChar::Int, 1) => (
            conv(
                file.into_vec::<i8>()
                    .map(|v| v.into_iter().map(f64::from).collect()),
            )?,
            Some(i8::MAX as f64),
        ),
        (TypeChar::Int, 2) => (
            conv(
                file.into_vec::<i16>()
                    .map(|v| v.into_iter().map(f64::from).collect()),
            )?,
            Some(i16::MAX as f64),
        ),
        (TypeChar::Int, 4) => (
            conv(
                file.into_vec::<i32>()
                    .map(|v| v.into_iter().map(f64::from).collect()),
            )?,
            Some(i32::MAX as f64),
        ),
        (TypeChar::Int, 8) => (
            conv(
                file.into_vec::<i64>()
                    .map(|v| v.into_iter().map(|x| x as f64).collect()),
            )?,
            Some(i64::MAX as f64),
        ),
        (TypeChar::Float, 4) => (
            conv(
                file.into_vec::<f32>()
                    .map(|v| v.into_iter().map(f64::from).collect()),
            )?,
            None,
        ),
        (TypeChar::Float, 8) => (conv(file.into_vec::<f64>())?, None),
        _ => return Err(bad(&dtype)),
    };
    Ok(Array {
        shape,
        values,
        int_max,
    })
}

/// Load split `split` of an npz archive: `<split>_images` ([N, H, W], [N, H, W, 1] or
/// [N, C, H, W]) and `<split>_labels` ([N] or [N, 1], integers).
pub fn load_npz(path: &Path, split: &str) -> Result<Dataset, DataError> {
    let p = path.display().to_string();
    let mut npz = npyz::npz::NpzArchive::open(path).map_err(|source| DataError::Io {
        path: p.clone(),
        source,
    })?;
    let img_name = format!("{split}_images");
    let lab_name = format!("{split}_labels");
    let imgs = read_array(&mut npz, &p, &img_name)?;
    let labs = read_array(&mut npz, &p, &lab_name)?;
    let origin = format!("{p} [{split}]");
    let s: Vec<usize> = imgs.shape.iter().map(|&d| d as usize).collect();
    let (n, chw, hwc) = match s.as_slice() {
        [n, h, w] => (*n, [1, *h, *w], false),
        [n, h, w, 1] => (*n, [1, *h, *w], false),
        [n, h, w, 3] => (*n, [3, *h, *w], true),
        [n, c, h, w] => (*n, [*c, *h, *w], false),
        _ => {
            return Err(DataError::Shape {
                path: p,
                name: img_name,
                shape: imgs.shape,
                want: "[N, H, W], [N, H, W, 1|3] or [N, C, H, W]".into(),
            });
        }
    };
    let lab_ok = matches!(labs.shape.as_slice(), [_] | [_, 1]);
    if labs.int_max.is_none() {
        return Err(DataError::Dtype {
            path: p,
            name: lab_name,
            dtype: "float".into(),
            want: "integer labels",
        });
    }
    if !lab_ok {
        return Err(DataError::Shape {
            path: p,
            name: lab_name,
            shape: labs.shape,
            want: "integer labels [N] or [N, 1]".into(),
        });
    }
    if labs.values.len() != n {
        return Err(DataError::CountMismatch {
            path: origin,
            images: n,
            labels: labs.values.len(),
        });
    }
    if n == 0 || chw.contains(&0) {
        return Err(DataError::Empty { path: origin });
    }
    let mut labels = Vec::with_capacity(n);
    for (index, &l) in labs.values.iter().enumerate() {
        if l < 0.0 || l > u32::MAX as f64 {
            return Err(DataError::LabelRange {
                path: origin,
                index,
                label: l as i64,
                classes: 0,
            });
        }
        labels.push(l as u32);
    }
    let scale = imgs.int_max.map_or(1.0, |m| 1.0 / m);
    let mut images: Vec<f32> = imgs.values.iter().map(|&v| (v * scale) as f32).collect();
    if hwc {
        let [c, h, w] = chw;
        let mut t = vec![0f32; images.len()];
        for i in 0..n {
            for y in 0..h * w {
                for ch in 0..c {
                    t[i * c * h * w + ch * h * w + y] = images[i * c * h * w + y * c + ch];
                }
            }
        }
        images = t;
    }
    Ok(Dataset {
        images,
        labels,
        chw,
        origin,
    })
}

/// Load DICOM files listed in a CSV with a header naming a `file` column (path relative to the
/// CSV's folder) and a `label` column (other columns are ignored, so the demo samples'
/// `file,SOPInstanceUID,label` works). Frame 0 of each file is used, stored value divided by the
/// largest value its BitsStored can hold; every image must have the same geometry.
pub fn load_dicom_csv(csv: &Path) -> Result<Dataset, DataError> {
    let p = csv.display().to_string();
    let text = std::fs::read_to_string(csv).map_err(|source| DataError::Io {
        path: p.clone(),
        source,
    })?;
    let dir = csv.parent().map(Path::to_path_buf).unwrap_or_default();
    let mut lines = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty());
    let Some((_, header)) = lines.next() else {
        return Err(DataError::Empty { path: p });
    };
    let cols: Vec<&str> = header.split(',').map(str::trim).collect();
    let col = |name: &str| {
        cols.iter()
            .position(|c| c.eq_ignore_ascii_case(name))
            .ok_or_else(|| DataError::Csv {
                path: p.clone(),
                line: 1,
                msg: format!("header has no `{name}` column (found: {header})"),
            })
    };
    let (fc, lc) = (col("file")?, col("label")?);
    let mut images = Vec::new();
    let mut labels = Vec::new();
    let mut chw: Option<[usize; 3]> = None;
    for (ln, line) in lines {
        let f: Vec<&str> = line.split(',').map(str::trim).collect();
        let csv_err = |msg: String| DataError::Csv {
            path: p.clone(),
            line: ln + 1,
            msg,
        };
        let (Some(file), Some(label)) = (f.get(fc), f.get(lc)) else {
            return Err(csv_err(format!("expected {} columns", cols.len())));
        };
        let label: u32 = label
            .parse()
            .map_err(|_| csv_err(format!("label `{label}` is not a non-negative integer")))?;
        let path: PathBuf = dir.join(file);
        let (img, shape) = read_dicom_frame(&path)?;
        match chw {
            None => chw = Some(shape),
            Some(c) if c != shape => {
                return Err(DataError::ImageShape {
                    path: path.display().to_string(),
                    got: shape,
                    want: c,
                });
            }
            _ => {}
        }
        images.extend(img);
        labels.push(label);
    }
    let Some(chw) = chw else {
        return Err(DataError::Empty { path: p });
    };
    Ok(Dataset {
        images,
        labels,
        chw,
        origin: p,
    })
}

fn read_dicom_frame(path: &Path) -> Result<(Vec<f32>, [usize; 3]), DataError> {
    let ps = path.display().to_string();
    let derr = |e: crate::dicom::DicomError| DataError::Dicom {
        path: ps.clone(),
        msg: e.to_string(),
    };
    let limits = DecodeLimits::default();
    let file = DicomFile::open(path, &limits).map_err(derr)?;
    let img = file.decode(&limits).map_err(derr)?;
    let m = &img.meta;
    let (lo, hi) = m.value_range();
    let frame = img.frame_f32(0).ok_or_else(|| DataError::Dicom {
        path: ps.clone(),
        msg: "no frame 0".into(),
    })?;
    let (c, h, w) = (
        m.samples_per_pixel as usize,
        m.rows as usize,
        m.cols as usize,
    );
    let (off, scale) = match m.kind {
        crate::dicom::PixelKind::Integer => (lo as f32, 1.0 / (hi - lo) as f32),
        _ => (0.0, 1.0),
    };
    // Interleaved samples -> planar (CHW).
    let mut out = vec![0f32; c * h * w];
    for px in 0..h * w {
        for ch in 0..c {
            out[ch * h * w + px] = (frame[px * c + ch] - off) * scale;
        }
    }
    Ok((out, [c, h, w]))
}
