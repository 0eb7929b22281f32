//! Where remotified pages go: donors chosen by spare memory with the power
//! of two random choices (pick two at random, take the one with more room:
//! nearly as balanced as always taking the emptiest, without every owner
//! piling onto the same node), memory servers first, replicas on distinct
//! nodes and, when nodes carry zone labels, distinct zones. Never a node
//! that is not up, is draining, or lacks the room.

use rand::Rng;

use super::membership::Role;

/// What an owner knows of a possible donor (from membership + heartbeats).
#[derive(Clone, Debug, PartialEq)]
pub struct DonorView {
    pub id: u32,
    pub role: Role,
    /// Up by heartbeat; suspect and down nodes are not candidates.
    pub up: bool,
    pub draining: bool,
    /// Bytes it can still take for us (donation limit and our quota applied).
    pub spare_bytes: u64,
    pub zone: Option<String>,
}

impl DonorView {
    fn can_take(&self, bytes: u64) -> bool {
        self.up && !self.draining && self.role != Role::Client && self.spare_bytes >= bytes
    }
}

/// Chooses up to `replicas` distinct donors for `bytes`, or fewer if not
/// enough qualify (the caller then keeps the page home).
pub fn choose_donors(
    candidates: &[DonorView],
    replicas: usize,
    bytes: u64,
    rng: &mut impl Rng,
) -> Vec<u32> {
    let mut chosen: Vec<&DonorView> = Vec::with_capacity(replicas);
    while chosen.len() < replicas {
        let distinct = |d: &&DonorView| {
            d.can_take(bytes)
                && chosen.iter().all(|c| c.id != d.id)
                && (d.zone.is_none() || chosen.iter().all(|c| c.zone != d.zone))
        };
        // Memory servers exist to donate: prefer them while any has room.
        let servers: Vec<&DonorView> = candidates
            .iter()
            .filter(|d| d.role == Role::MemoryServer)
            .filter(distinct)
            .collect();
        let pool = if servers.is_empty() {
            candidates.iter().filter(distinct).collect()
        } else {
            servers
        };
        let pick = match pool.len() {
            0 => break,
            1 => pool[0],
            n => {
                let a = pool[rng.random_range(0..n)];
                let mut b = pool[rng.random_range(0..n - 1)];
                if b.id == a.id {
                    b = pool[n - 1];
                }
                if a.spare_bytes >= b.spare_bytes { a } else { b }
            }
        };
        chosen.push(pick);
    }
    chosen.into_iter().map(|d| d.id).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::SmallRng;

    fn donor(id: u32, role: Role, spare: u64, zone: Option<&str>) -> DonorView {
        DonorView {
            id,
            role,
            up: true,
            draining: false,
            spare_bytes: spare,
            zone: zone.map(str::to_string),
        }
    }

    #[test]
    fn memory_servers_first_then_peers() {
        let mut rng = SmallRng::seed_from_u64(1);
        let c = [
            donor(1, Role::Peer, 1 << 30, None),
            donor(2, Role::MemoryServer, 1 << 20, None),
        ];
        for _ in 0..100 {
            assert_eq!(choose_donors(&c, 1, 4096, &mut rng), vec![2]);
            assert_eq!(choose_donors(&c, 2, 4096, &mut rng), vec![2, 1]);
        }
    }

    #[test]
    fn never_down_draining_full_or_client_nodes() {
        let mut rng = SmallRng::seed_from_u64(2);
        let mut down = donor(1, Role::Peer, 1 << 30, None);
        down.up = false;
        let mut draining = donor(2, Role::MemoryServer, 1 << 30, None);
        draining.draining = true;
        let full = donor(3, Role::Peer, 100, None);
        let client = donor(4, Role::Client, 1 << 30, None);
        let ok = donor(5, Role::Peer, 1 << 20, None);
        let c = [down, draining, full, client, ok];
        for _ in 0..100 {
            assert_eq!(choose_donors(&c, 3, 4096, &mut rng), vec![5]);
        }
    }

    #[test]
    fn replicas_land_in_distinct_zones() {
        let mut rng = SmallRng::seed_from_u64(3);
        let c = [
            donor(1, Role::Peer, 1 << 30, Some("a")),
            donor(2, Role::Peer, 1 << 30, Some("a")),
            donor(3, Role::Peer, 1 << 30, Some("b")),
        ];
        for _ in 0..100 {
            let mut got = choose_donors(&c, 2, 4096, &mut rng);
            got.sort();
            assert!(got == vec![1, 3] || got == vec![2, 3], "{got:?}");
        }
    }

    #[test]
    fn two_choices_favour_the_emptier_node() {
        let mut rng = SmallRng::seed_from_u64(4);
        let c: Vec<DonorView> = (0..4)
            .map(|i| donor(i, Role::Peer, (i as u64 + 1) << 20, None))
            .collect();
        let mut counts = [0u32; 4];
        for _ in 0..10_000 {
            counts[choose_donors(&c, 1, 4096, &mut rng)[0] as usize] += 1;
        }
        // The emptiest is picked most, the fullest least (never, with two choices of four).
        assert!(
            counts[3] > counts[2] && counts[2] > counts[1] && counts[1] > counts[0],
            "{counts:?}"
        );
    }
}
