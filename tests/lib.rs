//! Helpers shared by the end-to-end tests (they live in this folder as integration tests).
