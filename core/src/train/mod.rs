//! Training: built-in architectures or ONNX models with initial weights, data from `.npz` or
//! DICOM folders, SGD/Adam with schedules, seeded and bit-reproducible loops with validation,
//! early stopping, checkpoints, and adversarial training (Madry PGD, TRADES) on the runtime's
//! gradients.

pub mod adversarial;
pub mod arch;
pub mod checkpoint;
pub mod config;
pub mod data;
pub mod metrics;
pub mod optim;
pub mod samples;
pub mod trainer;
