//! Images: the Debian base (`base`), the layers a service runs on and the
//! store that keeps them (`image`), the build that makes a service's layer
//! (`build`), and the build's caches (`build_cache`).

pub mod base;
pub(crate) mod build;
pub(crate) mod build_cache;
pub mod image;
