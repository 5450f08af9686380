//! What nixpkgs' Python scripts print, byte for byte: JSON as `json.dumps` writes it, and
//! Python's reprs of strings and lists.

pub mod json;
