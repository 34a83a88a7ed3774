//! [`BrowserClock`]: the engine's [`Clock`] from `Date.now()`,
//! `performance.now()` and `Math.random()`.

use deltasync_engine::Clock;
use wasm_bindgen::JsCast;

/// The page's (or worker's) clocks.
#[derive(Debug, Default, Clone, Copy)]
pub struct BrowserClock;

/// 32 random bits from `Math.random()` (the engine needs no cryptographic randomness).
fn random_u32() -> u64 {
    (js_sys::Math::random() * 4_294_967_296.0) as u64
}

impl Clock for BrowserClock {
    fn wall_ms(&self) -> u64 {
        js_sys::Date::now() as u64
    }

    fn monotonic_ms(&self) -> u64 {
        // `performance` exists in windows and workers alike; without it, the wall clock.
        let performance = js_sys::Reflect::get(&js_sys::global(), &"performance".into()).ok();
        let now = performance
            .filter(|p| p.is_object())
            .and_then(|p| js_sys::Reflect::get(&p, &"now".into()).ok().map(|f| (p, f)))
            .and_then(|(p, f)| f.dyn_into::<js_sys::Function>().ok().and_then(|f| f.call0(&p).ok()))
            .and_then(|v| v.as_f64());
        now.map_or_else(|| self.wall_ms(), |ms| ms as u64)
    }

    fn random_u64(&self) -> u64 {
        (random_u32() << 32) | random_u32()
    }
}
