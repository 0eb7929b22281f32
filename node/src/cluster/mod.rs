//! The cluster: who is in it (membership), when pages move (watermarks),
//! where they go (placement), and what the host says about memory (pressure).

pub mod membership;
pub mod placement;
pub mod pressure;
pub mod watermarks;
