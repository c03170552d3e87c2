//! Digests through `ring`, the one crypto stack of the core (it also verifies JWT signatures and
//! seals the store with AES-256-GCM).

/// SHA-256, one shot or fed in parts.
pub struct Sha256(ring::digest::Context);

impl Sha256 {
    /// An empty hasher.
    pub fn new() -> Sha256 {
        Sha256(ring::digest::Context::new(&ring::digest::SHA256))
    }

    /// Feeds `data`.
    pub fn update(&mut self, data: impl AsRef<[u8]>) {
        self.0.update(data.as_ref());
    }

    /// The digest of everything fed.
    pub fn finalize(self) -> [u8; 32] {
        let mut out = [0u8; 32];
        out.copy_from_slice(self.0.finish().as_ref());
        out
    }

    /// The digest of `data`.
    pub fn digest(data: impl AsRef<[u8]>) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(data);
        h.finalize()
    }
}

impl Default for Sha256 {
    fn default() -> Self {
        Sha256::new()
    }
}

/// SHA-1 of `data`: only for certificate thumbprints, the identifier APIM and XFCC use.
pub fn sha1_thumbprint(data: &[u8]) -> [u8; 20] {
    let mut out = [0u8; 20];
    out.copy_from_slice(
        ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, data).as_ref(),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_answers() {
        assert_eq!(
            hex::encode(Sha256::digest(b"abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let mut h = Sha256::new();
        h.update(b"a");
        h.update(b"bc");
        assert_eq!(h.finalize(), Sha256::digest(b"abc"));
        assert_eq!(
            hex::encode(sha1_thumbprint(b"abc")),
            "a9993e364706816aba3e25717850c26c9cd0d89d"
        );
    }
}
