//! Page batches through the wire encoding and back: every page returns as it went,
//! zero and compressible pages shrink, and bad compressed data is an error that leaves
//! nothing behind.

mod common;

use common::Rng;
use tandem_proto::epoch::{Epoch, EpochHasher};
use tandem_proto::frame::Decoder;
use tandem_proto::message::{Compression, EpochKind, Message, MAX_BATCH_PAGES, PAGE_SIZE};
use tandem_proto::buffers::GiveBack;
use tandem_proto::pages::{decode_into, BatchEncoder};
use tandem_proto::{crc, ProtoError};

/// One batch's messages, as the receiver decodes them from the frames sent.
fn encode_batch(epoch: u64, addresses: &[u64], data: &[u8], compress: bool, hasher: &mut EpochHasher) -> Vec<Message> {
    let mut encoder = BatchEncoder::new(5, epoch, compress);
    encoder.batch(addresses, &bytes::Bytes::copy_from_slice(data), None, hasher).unwrap();
    let mut decoder = Decoder::default();
    let mut messages = Vec::new();
    for chunk in &encoder.frames {
        decoder.push(chunk);
        while let Some(frame) = decoder.next_frame().unwrap() {
            assert_eq!(frame.generation, 5);
            messages.push(frame.message);
        }
    }
    assert!(decoder.is_empty(), "a frame left unfinished");
    messages
}

/// A page of one of the kinds a guest has: zero, text-like, random, or one byte set.
fn page(rng: &mut Rng) -> Vec<u8> {
    let mut p = vec![0u8; PAGE_SIZE];
    match rng.next() % 4 {
        0 => {}
        1 => p.iter_mut().enumerate().for_each(|(i, b)| *b = b"tick 42 \n"[i % 9]),
        2 => p.iter_mut().for_each(|b| *b = rng.next() as u8),
        _ => p[(rng.next() % PAGE_SIZE as u64) as usize] = 1,
    }
    p
}

fn decode(messages: &[Message]) -> (Vec<u64>, Vec<u8>) {
    let (mut addresses, mut data) = (Vec::new(), Vec::new());
    for m in messages {
        m.validate().unwrap();
        match m {
            Message::ZeroPages { addresses: a, .. } => {
                addresses.extend(a);
                data.resize(data.len() + a.len() * PAGE_SIZE, 0);
            }
            Message::Pages { addresses: a, compression, data: d, .. } => {
                addresses.extend(a);
                decode_into(a.len(), *compression, &d.contiguous(), &mut data).unwrap();
            }
            other => panic!("{other:?}"),
        }
    }
    (addresses, data)
}

#[test]
fn random_batches_come_back_as_they_went() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for round in 0..200 {
        let n = 1 + (rng.next() % MAX_BATCH_PAGES as u64) as usize;
        let addresses: Vec<u64> = (0..n as u64).map(|i| (i * 7 + round) * PAGE_SIZE as u64).collect();
        let data: Vec<u8> = (0..n).flat_map(|_| page(&mut rng)).collect();
        let messages = encode_batch(1, &addresses, &data, round % 3 != 0, &mut EpochHasher::new(1));
        let (got_addresses, got_data) = decode(&messages);
        // Zero pages come first; every page comes back with its content.
        let want: std::collections::BTreeMap<u64, &[u8]> = addresses.iter().copied().zip(data.chunks(PAGE_SIZE)).collect();
        let got: std::collections::BTreeMap<u64, &[u8]> = got_addresses.iter().copied().zip(got_data.chunks(PAGE_SIZE)).collect();
        assert_eq!(got, want, "round {round}");
    }
}

#[test]
fn zero_and_compressible_pages_shrink() {
    let addresses: Vec<u64> = (0..64).map(|i| i * PAGE_SIZE as u64).collect();
    let data = vec![0u8; 64 * PAGE_SIZE];
    assert!(matches!(&encode_batch(1, &addresses, &data, true, &mut EpochHasher::new(1))[..], [Message::ZeroPages { .. }]));
    let text: Vec<u8> = (0..64 * PAGE_SIZE).map(|i| b"tick 42 \n"[i % 9]).collect();
    match &encode_batch(1, &addresses, &text, true, &mut EpochHasher::new(1))[..] {
        [Message::Pages { compression: Compression::Lz4, data, .. }] => assert!(data.len() < text.len() / 10),
        other => panic!("{other:?}"),
    }
}

#[test]
fn garbage_truncated_or_overlong_compressed_data_is_an_error() {
    let mut rng = Rng(7);
    let text: Vec<u8> = (0..8 * PAGE_SIZE).map(|i| b"tick 42 \n"[i % 9]).collect();
    let packed = lz4_flex::block::compress(&text);
    let mut out = vec![9u8; 3];
    // Claims of more or fewer pages than the data holds.
    assert!(decode_into(9, Compression::Lz4, &packed, &mut out).is_err());
    assert!(decode_into(7, Compression::Lz4, &packed, &mut out).is_err());
    assert!(decode_into(8, Compression::Lz4, &packed[..packed.len() - 3], &mut out).is_err());
    for _ in 0..2000 {
        let len = (rng.next() % 512) as usize;
        let garbage: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
        let pages = 1 + (rng.next() % 4) as usize;
        let _ = decode_into(pages, Compression::Lz4, &garbage, &mut out);
        assert_eq!(out, vec![9u8; 3], "a failed decode leaves nothing behind");
    }
    // Flipped bytes in good data: an error or other bytes, never a panic or more.
    for i in 0..packed.len() {
        let mut bad = packed.clone();
        bad[i] ^= 0xa5;
        let mut out = Vec::new();
        if decode_into(8, Compression::Lz4, &bad, &mut out).is_ok() {
            assert_eq!(out.len(), 8 * PAGE_SIZE);
        }
    }
    decode_into(8, Compression::Lz4, &packed, &mut out).unwrap();
    assert_eq!(&out[3..], &text[..]);
}

#[test]
fn a_batch_that_repeats_an_address_goes_as_it_is_in_order() {
    // The later copy of page 0 must win, so its zero copy may not be moved ahead.
    let addresses = vec![0, PAGE_SIZE as u64, 0];
    let mut data = vec![0u8; 3 * PAGE_SIZE];
    data[PAGE_SIZE..2 * PAGE_SIZE].fill(1);
    data[..PAGE_SIZE].fill(2);
    match &encode_batch(1, &addresses, &data, true, &mut EpochHasher::new(1))[..] {
        [Message::Pages { addresses: a, compression: Compression::None, data: d, .. }] => {
            assert_eq!((a, &d.contiguous()[..]), (&addresses, &data[..]));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn raw_pages_go_out_of_their_buffer_without_a_copy_and_it_comes_back_once_the_frames_are_gone() {
    let (back_tx, back_rx) = std::sync::mpsc::channel();
    let give_back: GiveBack = std::sync::Arc::new(move |buffer| {
        let _ = back_tx.send(buffer);
    });
    let mut rng = Rng(11);
    // Random pages around a zero one: two runs of raw pages, one zero marker.
    let mut data = Vec::with_capacity(5 * PAGE_SIZE);
    for i in 0..5u64 {
        data.extend((0..PAGE_SIZE).map(|_| if i == 2 { 0 } else { rng.next() as u8 }));
    }
    let addresses: Vec<u64> = (0..5).map(|i| i * PAGE_SIZE as u64).collect();
    let copy = Epoch { number: 4, kind: Some(EpochKind::Delta), addresses, data, state: vec![7; 9], ..Epoch::default() };
    let mut taken = copy.clone();
    let at = taken.data.as_ptr() as usize;
    let (chunks, _) = taken.encode_taking(3, Some(&give_back)).unwrap();
    assert!(taken.data.is_empty(), "the buffer went with the frames");
    // The second run starts at page 3 of the buffer, in place.
    let inside = |c: &bytes::Bytes| (at..at + 5 * PAGE_SIZE).contains(&(c.as_ptr() as usize));
    assert_eq!(chunks.iter().filter(|c| inside(c)).map(|c| c.len()).sum::<usize>(), 4 * PAGE_SIZE);
    assert!(chunks.iter().any(|c| c.as_ptr() as usize == at + 3 * PAGE_SIZE));
    // The receiver sees what a copied encoding gives it.
    let mut decoder = Decoder::default();
    let mut frames = Vec::new();
    for chunk in &chunks {
        decoder.push(chunk);
        while let Some(frame) = decoder.next_frame().unwrap() {
            frames.push(frame);
        }
    }
    assert_eq!(frames, copy.frames(3).unwrap());
    assert!(back_rx.try_recv().is_err(), "lent while a frame holds it");
    drop(chunks);
    let back = back_rx.try_recv().expect("given back");
    assert_eq!((back.as_ptr() as usize, back.len()), (at, 5 * PAGE_SIZE));
}

#[test]
fn pages_whose_crcs_the_capture_took_encode_as_read_pages_do_and_a_wrong_crc_is_refused() {
    let mut rng = Rng(23);
    for round in 0..40u64 {
        // Up to two batches and a half, of every kind of page.
        let n = 1 + (rng.next() % (5 * MAX_BATCH_PAGES as u64 / 2)) as usize;
        let addresses: Vec<u64> = (0..n as u64).map(|i| (i * 3 + round) * PAGE_SIZE as u64).collect();
        let data: Vec<u8> = (0..n).flat_map(|_| page(&mut rng)).collect();
        let read = Epoch { number: 3, kind: Some(EpochKind::Delta), addresses, data, state: vec![1; 5], compress: round % 2 == 0, ..Epoch::default() };
        let taken = Epoch { page_crcs: read.data.chunks(PAGE_SIZE).map(crc::page).collect(), ..read.clone() };
        assert_eq!(taken.encode(2).unwrap().0.concat(), read.encode(2).unwrap().0.concat(), "round {round}");
    }
    // Raw pages with one CRC wrong: the frame that carries that page fails its check.
    let data: Vec<u8> = (0..3 * PAGE_SIZE).map(|_| rng.next() as u8).collect();
    let mut page_crcs: Vec<u32> = data.chunks(PAGE_SIZE).map(crc::page).collect();
    page_crcs[1] ^= 1;
    let addresses = (0..3).map(|i| i * PAGE_SIZE as u64).collect();
    let wrong = Epoch { number: 3, kind: Some(EpochKind::Delta), addresses, data, page_crcs, ..Epoch::default() };
    let mut decoder = Decoder::default();
    let mut refused = None;
    for chunk in wrong.encode(2).unwrap().0 {
        decoder.push(&chunk);
        match decoder.next_frame() {
            Ok(_) => {}
            Err(e) => {
                refused = Some(e);
                break;
            }
        }
    }
    assert_eq!(refused, Some(ProtoError::Checksum));
}

#[test]
fn a_wrong_page_crc_from_the_capture_fails_a_compressed_batch_at_the_commit() {
    use tandem_proto::handshake::Identity;
    use tandem_proto::message::{Frame, Role};
    use tandem_proto::standby::{Event, Standby};
    // A compressed batch's frame is checked over what was sent; its pages' CRC counts
    // in the epoch's checksum, which the standby checks over the pages as decompressed.
    let primary = Identity { role: Role::Primary, fingerprint: 3, generation: 1 };
    let data: Vec<u8> = (0..4 * PAGE_SIZE).map(|i| (i % 251) as u8).collect();
    let crcs: Vec<u32> = data.chunks(PAGE_SIZE).map(crc::page).collect();
    let run = |page_crcs: Vec<u32>| {
        let addresses = (1..=4).map(|i| i * PAGE_SIZE as u64).collect();
        let epoch = Epoch { number: 1, kind: Some(EpochKind::Full), addresses, data: data.clone(), page_crcs, state: vec![1], compress: true, ..Epoch::default() };
        let frames = epoch.frames(1).unwrap();
        assert!(frames.iter().any(|f| matches!(f.message, Message::Pages { compression: Compression::Lz4, .. })));
        let mut standby = Standby::new(Identity { role: Role::Standby, ..primary }, None);
        standby.handle(primary.hello());
        frames.into_iter().flat_map(|f| standby.handle(f)).collect::<Vec<_>>()
    };
    let acked = |events: &[Event]| events.iter().any(|e| matches!(e, Event::Send(Frame { message: Message::Ack { epoch: 1 }, .. })));
    assert!(acked(&run(crcs.clone())));
    let mut wrong = crcs;
    wrong[2] ^= 1;
    let events = run(wrong);
    assert!(!acked(&events) && matches!(events.last(), Some(Event::Close(_))), "{events:?}");
}
