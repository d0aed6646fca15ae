//! The example policies, built for wasm32-wasip1 by the test run.
