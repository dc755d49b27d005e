//! Which of an optimizer step's forward passes each rank runs.
//!
//! The passes are the ones a single rank would run (fixed by the manifest and seed), so each pass keeps its
//! index, and with it its dropout draws: the run is the same on any number of ranks up to the order of the
//! gradient sums. Passes go to ranks by cost (positions computed: rows x sequence length, padding
//! included), largest first, each to the least loaded rank (ties: the lower pass index, the lower rank), so
//! ranks finish together and every rank computes the same assignment without talking.
use crate::data::batch::HostBatch;

/// For each rank, the indices of the passes it runs, ascending.
pub fn assign(passes: &[HostBatch], world: usize) -> Vec<Vec<usize>> {
    let costs: Vec<usize> = passes.iter().map(|b| b.rows * b.seq).collect();
    assign_costs(&costs, world)
}

fn assign_costs(costs: &[usize], world: usize) -> Vec<Vec<usize>> {
    let world = world.max(1);
    let mut order: Vec<usize> = (0..costs.len()).collect();
    order.sort_by_key(|&i| (std::cmp::Reverse(costs[i]), i));
    let mut load = vec![0usize; world];
    let mut out = vec![Vec::new(); world];
    for i in order {
        let rank = (0..world).min_by_key(|&r| (load[r], r)).expect("world >= 1");
        load[rank] += costs[i];
        out[rank].push(i);
    }
    out.iter_mut().for_each(|o| o.sort_unstable());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_pass_goes_to_exactly_one_rank_and_loads_balance() {
        let costs = [100, 40, 60, 50, 50, 10, 90];
        for world in 1..=5 {
            let a = assign_costs(&costs, world);
            assert_eq!(a.len(), world);
            let mut all: Vec<usize> = a.concat();
            all.sort();
            assert_eq!(all, (0..costs.len()).collect::<Vec<_>>(), "world {world}");
            assert!(a.iter().all(|r| r.windows(2).all(|w| w[0] < w[1])), "ascending: {a:?}");
        }
        assert_eq!(assign_costs(&costs, 1), vec![vec![0, 1, 2, 3, 4, 5, 6]]);
        // 400 positions over 2 ranks: 200 each (100+50+50 and 90+60+40+10).
        let two = assign_costs(&costs, 2);
        let loads: Vec<usize> = two.iter().map(|r| r.iter().map(|&i| costs[i]).sum()).collect();
        assert_eq!(loads, vec![200, 200], "{two:?}");
        // Equal passes spread evenly, the lower ranks first when they do not divide.
        assert_eq!(assign_costs(&[8; 5], 3), vec![vec![0, 3], vec![1, 4], vec![2]]);
        // More ranks than passes: some ranks run none.
        assert_eq!(assign_costs(&[5, 7], 3), vec![vec![1], vec![0], vec![]]);
    }
}
