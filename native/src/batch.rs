//! Many frames into one contiguous buffer: the server writes one batch per
//! connection per loop tick, so a batch costs one allocation and one write.

use crate::frame::{encoded_len, write_frame, EncodeError, FrameRef};

/// Validates every frame and returns the total encoded size.
pub fn batch_len(frames: &[FrameRef<'_>], max_frame: u32) -> Result<usize, EncodeError> {
    frames
        .iter()
        .try_fold(0usize, |acc, f| Ok(acc + encoded_len(f, max_frame)?))
}

/// Writes `frames` back to back into `out`, which must be exactly
/// `batch_len(frames)` bytes (the Python layer hands in the bytes object's
/// own storage, so nothing is copied afterwards).
pub fn write_batch(
    frames: &[FrameRef<'_>],
    max_frame: u32,
    out: &mut [u8],
) -> Result<(), EncodeError> {
    let mut pos = 0;
    for f in frames {
        let n = encoded_len(f, max_frame)?;
        write_frame(f, &mut out[pos..pos + n]);
        pos += n;
    }
    debug_assert_eq!(pos, out.len());
    Ok(())
}

/// Encodes `frames` into one buffer, allocated once at its final size.
pub fn encode_batch(frames: &[FrameRef<'_>], max_frame: u32) -> Result<Vec<u8>, EncodeError> {
    let mut out = vec![0u8; batch_len(frames, max_frame)?];
    write_batch(frames, max_frame, &mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{encode, Decoder, Frame, DEFAULT_MAX_FRAME};

    fn frames() -> Vec<Frame> {
        (0..50u64)
            .map(|i| Frame::Deliver {
                tag: i + 1,
                ts_ms: 1_700_000_000_000 + i,
                sender: format!("user{i}"),
                msg_id: format!("{i:032x}"),
                body: vec![i as u8; i as usize * 3],
            })
            .chain([
                Frame::Ping { nonce: 9 },
                Frame::Ack {
                    msg_id: "a".into(),
                    flags: 3,
                },
                Frame::RouteSend {
                    ts_ms: 5,
                    flags: crate::frame::ROUTE_FLAG_REPLAY,
                    sender: "a".into(),
                    msg_id: "m".into(),
                    to: "b".into(),
                    body: b"hi".to_vec(),
                },
                Frame::LinkHello {
                    worker: 1,
                    pid: 2,
                    epoch: 3,
                },
            ])
            .collect()
    }

    #[test]
    fn batch_equals_concatenation_of_single_encodes() {
        let owned = frames();
        let refs: Vec<_> = owned.iter().map(Frame::as_ref).collect();
        let batch = encode_batch(&refs, DEFAULT_MAX_FRAME).unwrap();
        let concat: Vec<u8> = refs
            .iter()
            .flat_map(|f| encode(f, DEFAULT_MAX_FRAME).unwrap())
            .collect();
        assert_eq!(batch, concat);
        assert_eq!(batch.capacity(), batch.len());
        let decoded: Vec<_> = Decoder::new_internal(DEFAULT_MAX_FRAME)
            .feed_owned(&batch)
            .into_iter()
            .map(Result::unwrap)
            .collect();
        assert_eq!(decoded, owned);
    }

    #[test]
    fn empty_batch_is_empty() {
        assert!(encode_batch(&[], DEFAULT_MAX_FRAME).unwrap().is_empty());
    }

    #[test]
    fn one_bad_frame_fails_the_batch() {
        let long = "x".repeat(300);
        let refs = [
            FrameRef::Ping { nonce: 1 },
            FrameRef::Ack {
                msg_id: &long,
                flags: 0,
            },
        ];
        assert!(matches!(
            encode_batch(&refs, DEFAULT_MAX_FRAME),
            Err(EncodeError::StringTooLong {
                field: "msg_id",
                ..
            })
        ));
        let refs = [FrameRef::Ping { nonce: 1 }];
        assert!(matches!(
            encode_batch(&refs, 8),
            Err(EncodeError::FrameTooLarge { .. })
        ));
    }
}
