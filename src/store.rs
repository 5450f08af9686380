//! Store paths, Nix base32 and closure graphs (the little of nix-compat we need).
//! (Being written: issue 3.)
