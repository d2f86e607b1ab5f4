//! The device mesh: the world's ranks laid out along the axes dp × pp × sp × tp, tp innermost (so
//! a tensor-parallel group stays on one node), and the group of ranks along each axis.

use super::Group;
use crate::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Axis {
    Dp,
    Pp,
    Sp,
    Tp,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceMesh {
    /// Sizes in layout order: dp, pp, sp, tp.
    pub sizes: [usize; 4],
    pub world: usize,
}

impl DeviceMesh {
    /// Checks once that the axes multiply to the world size.
    pub fn new(world: usize, dp: usize, pp: usize, sp: usize, tp: usize) -> Result<DeviceMesh> {
        let product = dp.checked_mul(pp).and_then(|x| x.checked_mul(sp)).and_then(|x| x.checked_mul(tp));
        if product != Some(world) || world == 0 {
            return Err(Error::Unsupported {
                field: "parallel".into(),
                message: format!("dp {dp} × pp {pp} × sp {sp} × tp {tp} does not make the world of {world} ranks"),
            });
        }
        Ok(DeviceMesh { sizes: [dp, pp, sp, tp], world })
    }

    fn index(axis: Axis) -> usize {
        match axis {
            Axis::Dp => 0,
            Axis::Pp => 1,
            Axis::Sp => 2,
            Axis::Tp => 3,
        }
    }

    /// A rank's coordinate on each axis.
    pub fn coords(&self, rank: usize) -> [usize; 4] {
        let mut c = [0; 4];
        let mut r = rank;
        for i in (0..4).rev() {
            c[i] = r % self.sizes[i];
            r /= self.sizes[i];
        }
        c
    }

    fn rank_of(&self, c: [usize; 4]) -> usize {
        c.iter().zip(&self.sizes).fold(0, |acc, (x, s)| acc * s + x)
    }

    /// The ranks that differ from `rank` only along `axis`, in axis order.
    pub fn group(&self, axis: Axis, rank: usize) -> Group {
        let i = Self::index(axis);
        let mut c = self.coords(rank);
        let me = c[i];
        let ranks = (0..self.sizes[i])
            .map(|x| {
                c[i] = x;
                self.rank_of(c)
            })
            .collect();
        Group { ranks, me }
    }
}

impl DeviceMesh {
    /// The ranks that differ from `rank` only along `axes` (data parallelism's gradients are
    /// summed over dp × sp, whose ranks hold the same parameters), in rank order.
    pub fn group_over(&self, axes: &[Axis], rank: usize) -> Group {
        let free: Vec<usize> = axes.iter().map(|a| Self::index(*a)).collect();
        let mine = self.coords(rank);
        let ranks: Vec<usize> = (0..self.world)
            .filter(|&r| {
                let c = self.coords(r);
                (0..4).all(|i| free.contains(&i) || c[i] == mine[i])
            })
            .collect();
        let me = ranks.iter().position(|&r| r == rank).expect("a rank is in its own group");
        Group { ranks, me }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_along_each_axis_partition_the_world() {
        let m = DeviceMesh::new(8, 2, 1, 1, 4).unwrap();
        assert_eq!(m.group(Axis::Tp, 5), Group { ranks: vec![4, 5, 6, 7], me: 1 });
        assert_eq!(m.group(Axis::Dp, 5), Group { ranks: vec![1, 5], me: 1 });
        assert_eq!(m.group(Axis::Pp, 5), Group { ranks: vec![5], me: 0 });
        for r in 0..8 {
            assert_eq!(m.rank_of(m.coords(r)), r);
        }
        assert!(DeviceMesh::new(8, 3, 1, 1, 2).unwrap_err().to_string().contains("does not make the world of 8"));
        // dp 2 × sp 2 × tp 2: rank 5 is (dp 1, sp 0, tp 1); over dp and sp with tp 1.
        let m = DeviceMesh::new(8, 2, 1, 2, 2).unwrap();
        assert_eq!(m.group_over(&[Axis::Dp, Axis::Sp], 5), Group { ranks: vec![1, 3, 5, 7], me: 2 });
        assert_eq!(m.group_over(&[Axis::Dp], 5), m.group(Axis::Dp, 5));
    }
}
