//! Which of a block's live versions recovery keeps, and why (format rule
//! 5): one pure rule for recovery, `check` and `dump`.
//!
//! A block may have several live versions in media: its newest, older
//! dirty versions that ordered writeback still owes the origin, and older
//! versions nobody needs any more, not yet durably FREE (rule 2 keeps them
//! until the watermark covers them).

/// What recovery needs to know of one live version of a block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Version {
    /// The client epoch its write committed in.
    pub epoch: u64,
    /// Not yet written back (state word DIRTY).
    pub dirty: bool,
}

/// What a live version is to recovery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The block's newest version: what reads return.
    Current,
    /// An older dirty version that ordered writeback writes to the origin
    /// before the newer ones: kept until its epoch is written back.
    Retained,
    /// An older version nothing needs: recovery frees it.
    Superseded,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Current => "current",
            Role::Retained => "retained",
            Role::Superseded => "superseded",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whether `old`, followed (by seq) by `next` of the same block, is
/// retained as long as no clean version follows: both are dirty, and
/// `old`'s epoch is not yet on the origin (above W, `written`) and ends
/// before `next`'s, so `old` is its epoch's newest version. `written` is
/// `None` when writeback is not ordered: nothing is retained then.
pub fn retained(old: Version, next: Version, written: Option<u64>) -> bool {
    old.dirty && next.dirty && written.is_some_and(|w| old.epoch > w && old.epoch < next.epoch)
}

/// The role of each of a block's live versions, given in seq order
/// (oldest first): the newest is current; an older one is retained when
/// [`retained`] holds for it and the version after it, and no clean
/// version follows it (a clean one's epoch was written back after
/// theirs); every other one is superseded.
pub fn roles(versions: &[Version], written: Option<u64>) -> Vec<Role> {
    let n = versions.len();
    let mut out = vec![Role::Superseded; n];
    let Some(last) = n.checked_sub(1) else {
        return out;
    };
    out[last] = Role::Current;
    let after_clean = versions.iter().rposition(|v| !v.dirty).map_or(0, |i| i + 1);
    for i in after_clean..last {
        if retained(versions[i], versions[i + 1], written) {
            out[i] = Role::Retained;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use Role::*;

    fn dirty(epoch: u64) -> Version {
        Version { epoch, dirty: true }
    }

    fn clean(epoch: u64) -> Version {
        Version {
            epoch,
            dirty: false,
        }
    }

    #[test]
    fn the_newest_of_each_epoch_above_w_is_retained() {
        let w = Some(4);
        assert_eq!(roles(&[], w), []);
        assert_eq!(roles(&[dirty(5)], w), [Current]);
        // Epoch 5's newest is retained, its older one is not; epoch 6's
        // newest is retained too; 7 is current.
        let vs = [dirty(5), dirty(5), dirty(6), dirty(7)];
        assert_eq!(roles(&vs, w), [Superseded, Retained, Retained, Current]);
        // At or below W: on the origin already.
        assert_eq!(
            roles(&[dirty(3), dirty(4), dirty(5)], w),
            [Superseded, Superseded, Current]
        );
        // The same epoch as the newest: overwritten within its epoch.
        assert_eq!(roles(&[dirty(6), dirty(6)], w), [Superseded, Current]);
    }

    #[test]
    fn a_clean_version_ends_what_came_before_it() {
        let w = Some(0);
        assert_eq!(
            roles(&[dirty(1), dirty(2), clean(3)], w),
            [Superseded, Superseded, Current]
        );
        assert_eq!(
            roles(&[dirty(1), clean(2), dirty(3), dirty(4)], w),
            [Superseded, Superseded, Retained, Current]
        );
        // A clean version is never retained, nor one before a clean one.
        assert!(!retained(clean(1), dirty(2), w));
        assert!(!retained(dirty(1), clean(2), w));
    }

    #[test]
    fn without_ordered_writeback_nothing_is_retained() {
        let vs = [dirty(1), dirty(2), dirty(3)];
        assert_eq!(roles(&vs, None), [Superseded, Superseded, Current]);
        assert_eq!(
            roles(&vs, Some(0)),
            [Retained, Retained, Current],
            "the same versions, ordered"
        );
    }
}
