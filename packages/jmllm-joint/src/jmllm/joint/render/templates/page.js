(function () {
  const picker = document.getElementById('pick');
  const words = document.querySelectorAll('button.w');
  function show(key) {
    document.querySelectorAll('.panel').forEach(p => p.classList.toggle('on', p.id === 'p-' + key));
    words.forEach(b => {
      const on = b.dataset.k === key;
      b.classList.toggle('on', on);
      b.setAttribute('aria-pressed', on ? 'true' : 'false');
    });
    if (picker && picker.value !== key && Array.from(picker.options).some(o => o.value === key)) {
      picker.value = key;
    }
  }
  words.forEach(b => b.addEventListener('click', () => show(b.dataset.k)));
  if (picker) { picker.addEventListener('change', () => show(picker.value)); }
  // the page opens on the picker's selected word (the first naming a query), else the first
  if (picker && picker.value) { show(picker.value); } else if (words.length) { show(words[0].dataset.k); }
})();
