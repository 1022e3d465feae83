//! Completion accounting of one send operation (plain `SEND` or `SEND_ZC`), kept free of I/O so it
//! can be tested against hand-made completion entries.
//!
//! A `SEND_ZC` produces a result CQE (bytes sent, or `-errno`) flagged `IORING_CQE_F_MORE` when a
//! notification CQE will follow; the notification (flagged `IORING_CQE_F_NOTIF`) says the kernel
//! no longer uses the buffer. With `IORING_SEND_ZC_REPORT_USAGE`, bit 31 of the notification's
//! result (`IORING_NOTIF_USAGE_ZC_COPIED`) means "the data was copied instead" — not an error.

/// `IORING_CQE_F_MORE`.
pub(crate) const CQE_F_MORE: u32 = 1 << 1;
/// `IORING_CQE_F_NOTIF`.
pub(crate) const CQE_F_NOTIF: u32 = 1 << 3;
/// `IORING_NOTIF_USAGE_ZC_COPIED`.
pub(crate) const NOTIF_USAGE_ZC_COPIED: u32 = 1 << 31;
/// `IORING_SEND_ZC_REPORT_USAGE` (zc_flags of the SQE).
pub(crate) const SEND_ZC_REPORT_USAGE: u16 = 1 << 3;

/// Progress of sending `total` bytes, possibly over several submissions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SendTrack {
    pub(crate) total: usize,
    pub(crate) sent: usize,
    /// A result CQE is awaited.
    pub(crate) result_pending: bool,
    /// Notification CQEs still awaited (the buffer is in use while > 0); a notification that
    /// overtakes its result CQE makes this briefly negative.
    pub(crate) notifs_pending: i32,
    /// Notifications that reported a copy.
    pub(crate) copied: u32,
    /// Notifications that reported true zero copy.
    pub(crate) zerocopied: u32,
    /// First error (negative errno).
    pub(crate) error: Option<i32>,
}

/// What the driver must do after a CQE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Next {
    /// Wait for more CQEs.
    Wait,
    /// Submit the remaining bytes (`sent..total`).
    Resubmit,
    /// Everything sent and the buffer released.
    Done,
    /// Failed with this errno; the buffer is released.
    Failed(i32),
}

impl SendTrack {
    pub(crate) fn new(total: usize) -> SendTrack {
        SendTrack {
            total,
            sent: 0,
            result_pending: false,
            notifs_pending: 0,
            copied: 0,
            zerocopied: 0,
            error: None,
        }
    }

    /// Records a submission of the remaining bytes.
    pub(crate) fn submitted(&mut self) {
        self.result_pending = true;
    }

    /// True while the kernel may still use the buffer.
    pub(crate) fn in_flight(&self) -> bool {
        self.result_pending || self.notifs_pending > 0
    }

    /// Whether the next part may be submitted now: no result is awaited, nothing failed, bytes
    /// remain. Zero-copy notifications of earlier parts may still be pending (each part has its
    /// own); the buffer is released only once all of them arrived.
    pub(crate) fn may_submit(&self) -> bool {
        !self.result_pending && self.error.is_none() && self.sent < self.total
    }

    /// Applies one CQE (`res`, `flags`) of this operation.
    pub(crate) fn on_cqe(&mut self, res: i32, flags: u32) -> Next {
        if flags & CQE_F_NOTIF != 0 {
            self.notifs_pending -= 1;
            if (res as u32) & NOTIF_USAGE_ZC_COPIED != 0 {
                self.copied += 1;
            } else {
                self.zerocopied += 1;
            }
        } else {
            self.result_pending = false;
            if flags & CQE_F_MORE != 0 {
                self.notifs_pending += 1;
            }
            if res < 0 {
                // Retryable: interrupted, would block, or cancelled because the submitting thread
                // exited (io_uring ties requests to their submitter).
                if ![-libc::EINTR, -libc::EAGAIN, -libc::ECANCELED].contains(&res) {
                    self.error.get_or_insert(-res);
                }
            } else {
                self.sent = (self.sent + res as usize).min(self.total);
            }
        }
        if self.may_submit() {
            return Next::Resubmit;
        }
        if self.in_flight() {
            return Next::Wait;
        }
        match self.error {
            Some(e) => Next::Failed(e),
            None => Next::Done,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_send_partial_then_done() {
        let mut t = SendTrack::new(100);
        t.submitted();
        assert_eq!(t.on_cqe(60, 0), Next::Resubmit);
        t.submitted();
        assert_eq!(t.on_cqe(40, 0), Next::Done);
    }

    #[test]
    fn zc_waits_for_notification_and_copied_bit_is_not_an_error() {
        let mut t = SendTrack::new(100);
        t.submitted();
        assert_eq!(t.on_cqe(100, CQE_F_MORE), Next::Wait, "buffer still in use");
        // Notification with bit 31 set: the kernel copied. As an i32 that is negative.
        let copied = NOTIF_USAGE_ZC_COPIED as i32;
        assert!(copied < 0);
        assert_eq!(t.on_cqe(copied, CQE_F_NOTIF), Next::Done);
        assert_eq!((t.copied, t.zerocopied, t.error), (1, 0, None));
    }

    #[test]
    fn zc_parts_go_out_while_earlier_notifications_are_pending() {
        let mut t = SendTrack::new(300);
        t.submitted();
        // Part 1 sent; its notification is still to come, yet part 2 may go.
        assert_eq!(t.on_cqe(100, CQE_F_MORE), Next::Resubmit);
        assert!(t.in_flight() && t.may_submit());
        t.submitted();
        assert!(!t.may_submit(), "one submission at a time");
        assert_eq!(
            t.on_cqe(200, CQE_F_MORE),
            Next::Wait,
            "two notifications pending"
        );
        assert!(!t.may_submit());
        assert_eq!(t.on_cqe(0, CQE_F_NOTIF), Next::Wait);
        assert_eq!(t.on_cqe(0, CQE_F_NOTIF), Next::Done);
        assert_eq!((t.zerocopied, t.sent), (2, 300));
    }

    #[test]
    fn a_failed_part_waits_for_earlier_notifications_then_fails() {
        let mut t = SendTrack::new(300);
        t.submitted();
        assert_eq!(t.on_cqe(100, CQE_F_MORE), Next::Resubmit);
        t.submitted();
        assert_eq!(t.on_cqe(-libc::EPIPE, 0), Next::Wait, "buffer still in use");
        assert!(!t.may_submit());
        assert_eq!(t.on_cqe(0, CQE_F_NOTIF), Next::Failed(libc::EPIPE));
    }

    #[test]
    fn zc_notification_may_arrive_before_result() {
        let mut t = SendTrack::new(10);
        t.submitted();
        assert_eq!(t.on_cqe(0, CQE_F_NOTIF), Next::Wait, "result still pending");
        assert_eq!(t.on_cqe(10, CQE_F_MORE), Next::Done);
        assert_eq!(t.zerocopied, 1);
    }

    #[test]
    fn zc_partial_send_resubmits_at_once_and_errors_wait_for_release() {
        let mut t = SendTrack::new(100);
        t.submitted();
        assert_eq!(
            t.on_cqe(30, CQE_F_MORE),
            Next::Resubmit,
            "the next part need not wait for this part's notification"
        );
        t.submitted();
        assert_eq!(t.on_cqe(0, CQE_F_NOTIF), Next::Wait, "a result is pending");
        assert_eq!(t.on_cqe(-libc::ECONNRESET, CQE_F_MORE), Next::Wait);
        assert_eq!(
            t.on_cqe(NOTIF_USAGE_ZC_COPIED as i32, CQE_F_NOTIF),
            Next::Failed(libc::ECONNRESET)
        );
    }

    #[test]
    fn eagain_and_ecanceled_are_retried_not_failed() {
        let mut t = SendTrack::new(8);
        t.submitted();
        assert_eq!(t.on_cqe(-libc::EAGAIN, 0), Next::Resubmit);
        t.submitted();
        assert_eq!(t.on_cqe(-libc::ECANCELED, 0), Next::Resubmit);
        t.submitted();
        assert_eq!(t.on_cqe(8, 0), Next::Done);
    }
}
