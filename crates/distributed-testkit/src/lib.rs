//! Test rig (filled by the rig work).
